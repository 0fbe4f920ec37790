"""The blkcache command: a thin shell over blkcache.api.

Each command opens its devices through the API, renders the results and
returns an exit code from blkcache.exitcodes.  Only click is imported at
start-up; the API (and its native module) is imported by the commands.
"""

import contextlib
import functools
import io
import os
import sys

import click

from ._version import __version__


class _LazyModule:
    """A module imported on first use: ``json`` costs start-up time that
    ``blkcache --version`` and the table output never need."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        import importlib

        module = importlib.import_module(self._name)
        globals()[self._name] = module      # later uses skip this proxy
        return getattr(module, attr)


json = _LazyModule("json")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_STATUS_HELP = """\b
Exit status:
  0   success; verify: no page of the range is cached;
      verify --coherence: every clean cached page matches the device
  1   pages remain cached (verify found some, drop could not drop all);
      verify --coherence: stale pages; watch --until-empty: pages remain
  2   usage error or bad input (option, size, range, path, file type)
  3   unknown: the kernel will not tell this user; never "clean"
  4   drop --expect-clean refused: dirty pages found, nothing done;
      verify --coherence: dirty pages not compared (and none stale)
  5   failure: permission denied, I/O error, failed write-back (now or
      on record: see --discard-failed, 'blkcache failures'), state
      directory not trusted, method unavailable, device gone, output not
      delivered (standard output full or closed)
  32  several devices: all failed;  64  several devices: some failed"""


def display(path):
    """A path printable on one line: undecodable bytes and controls escaped."""
    if path is None:
        return ""
    text = path if isinstance(path, str) else str(path)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error(message):
    try:
        click.echo(f"blkcache: {message}", err=True)
    except OSError:
        pass    # stderr is gone or full: the exit status still tells


def describe(exc):
    """One line for an exception raised by the API."""
    from .errors import BlkcacheError, WritebackError

    path = getattr(exc, "path", None) if isinstance(exc, BlkcacheError) else exc.filename
    where = f"{display(path)}: " if path else ""
    if isinstance(exc, WritebackError):
        dirty = exc.before.dirty if exc.before is not None else None
        still = exc.after.dirty if exc.after is not None else None
        if exc.record:
            later = f"later drops refuse until --discard-failed; record {exc.record}"
        else:
            later = (f"the failure could not be recorded ({exc.record_error}): do not drop "
                     "this device again before the data is safe")
        return (f"{where}write-back failed: {exc.strerror}; {_count(dirty)} pages were dirty, "
                f"{_count(still)} still dirty; nothing was dropped (the cached pages may "
                f"be the only copy of that data; {later})")
    if isinstance(exc, BlkcacheError):
        fix = getattr(exc, "fix", None)
        return f"{where}{exc.message}" + (f" (fix: {fix})" if fix else "")
    return f"{where}{exc.strerror or exc}"


def _count(value):
    return "?" if value is None else str(value)


class SizeType(click.ParamType):
    """A byte size with an optional K/M/G/T... suffix (see blkcache.sizes)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from .errors import UsageError
        from .sizes import parse_size

        try:
            return parse_size(value, param.name if param else "size")
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


def range_options(func):
    @click.option("--offset", "-o", type=SIZE, default=0, show_default=True,
                  help="Start of the range (bytes; K, M, G, T suffixes; rounded down "
                       "to a page).")
    @click.option("--length", "-l", type=SIZE, default=None,
                  help="Length of the range (default: to the end; rounded up to a page).")
    @click.option("--interface", type=click.Choice(["auto", "cachestat", "mincore"]),
                  default="auto", show_default=True,
                  help="Kernel interface for residency: cachestat(2), falling back to "
                       "mincore(2) only where cachestat is missing.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


def output_options(func):
    @click.option("-J", "--json", "as_json", is_flag=True, help="Print JSON.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


def run_targets(paths, action, recursive=False, offset=0, length=None):
    """Open every path, run ``action(target, label)`` on each, combine exit codes.

    ``action`` returns (record, code); ``label`` names the row (the path, and
    with ``recursive`` its relation).  API errors become one line on stderr;
    bad input on any path (its type, or the range ``offset``/``length`` past
    its end) stops before anything is done.  With ``recursive``, each path is
    expanded into itself and its related devices (see expand_devices).
    Returns (records, code, devices): the records each with its Related (or
    None), and the Devices run on.
    """

    from . import api, exitcodes
    from .errors import BlkcacheError

    devices = Devices(paths, recursive)
    records, codes = [], list(devices.codes)
    with contextlib.ExitStack() as stack:
        try:
            targets = api.open_targets(devices.paths, stack, offset, length)
        except (OSError, BlkcacheError) as exc:
            error(describe(exc))
            return records, exitcodes.for_error(exc), devices
        for target in targets:
            try:
                record, code = action(target, devices.label(target.path))
            except (OSError, BlkcacheError) as exc:
                error(describe(exc))
                code = exitcodes.for_error(exc)
                record = None
            if record is not None:
                records.append((record, devices.relations.get(target.path)))
            codes.append(code)
    return records, exitcodes.combine(codes), devices


class Devices:
    """The devices of one command: those named, or with --recursive each with
    its related devices (and how each relates); without it, which related
    devices were left out."""

    def __init__(self, paths, recursive):
        self.named = list(paths)
        self.recursive = recursive
        self.relations = {}
        self.codes = []
        self.paths = self.named
        if recursive:
            rels, self.codes = expand_devices(self.named)
            self.relations = {rel.path: rel for rel in rels}
            self.paths = [rel.path for rel in rels]
        self._unchecked = None

    def label(self, path):
        """The row's name: the path, and for a related device its relation."""
        rel = self.relations.get(path)
        if rel is None or rel.relation == "self":
            return display(path)
        return f"{display(path)} ({rel.relation} of {display(rel.parent)})"

    @staticmethod
    def relation(rel):
        """The RELATION column: self, or relation:parent."""
        if rel is None or rel.relation == "self":
            return "self"
        return f"{rel.relation}:{display(rel.parent)}"

    def unchecked(self):
        """Related devices that were not handled (none with --recursive)."""
        if self._unchecked is None:
            from . import stack

            self._unchecked = [] if self.recursive else stack.unchecked(self.named)
        return self._unchecked

    def note(self):
        """One line about related devices not checked, or None."""
        left = self.unchecked()
        if not left:
            return None
        shown = ", ".join(f"{display(rel.name)}: {rel.relation} of {display(rel.parent)}"
                          for rel in left[:4])
        more = f", and {len(left) - 4} more" if len(left) > 4 else ""
        noun = "device" if len(left) == 1 else "devices"
        return f"{len(left)} related {noun} not checked ({shown}{more}); use -r"

    def tell(self, quiet=False):
        """Print the note on standard error (not with --quiet)."""
        line = self.note()
        if line and not quiet:
            error(line)

    def to_json(self, record, rel):
        """A record's JSON object, with its relation under --recursive."""
        if not self.recursive:
            return record
        return {**record, "relation": rel.relation if rel else "self",
                "parent": rel.parent if rel else None}


def emit_json(key, records, devices):
    """Print the records (dicts, each with its Related) under ``key``, and
    the related devices that were not checked."""
    click.echo(json.dumps({key: [devices.to_json(record, rel) for record, rel in records],
                           "not_checked": [rel.to_dict() for rel in devices.unchecked()]},
                          indent=2))


class BlkcacheGroup(click.Group):
    """Turns every click error into one 'blkcache: ...' line and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        _fill_standard_fds()
        guard = GuardedStdout.install()
        try:
            code = self._run(args, prog_name, complete_var, **extra)
        finally:
            lost = guard.remove() if guard is not None else None
        if lost is not None:
            from . import exitcodes

            if not isinstance(lost, BrokenPipeError):
                error(f"cannot write output: {lost.strerror or lost}")
            code = exitcodes.for_output_error(code, lost)
        sys.exit(code)

    def _run(self, args, prog_name, complete_var, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name or "blkcache",
                                complete_var=complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx else ""
            error(f"{exc.format_message().rstrip('.')}{hint}")
            code = 2
        except click.ClickException as exc:
            error(exc.format_message())
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            error("interrupted")
            code = 130
        except BrokenPipeError:
            code = 0
        return code if isinstance(code, int) else 0


def _fill_standard_fds():
    """Put /dev/null on a closed descriptor 0, 1 or 2, so that no device or
    record opened later takes its number (and the helper inherits nothing
    of ours there).  sys.stdout stays None: GuardedStdout sees it closed."""
    import fcntl

    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            with contextlib.suppress(OSError):
                os.open(os.devnull, os.O_RDWR)     # the lowest free number: fd


class _ClosedStdout(io.RawIOBase):
    """Where output goes when standard output was closed (`>&-`): nowhere,
    but what was written is remembered, to be reported as lost."""

    written = False

    def writable(self):
        return True

    def write(self, data):
        if len(data):
            self.written = True
        return len(data)


class GuardedStdout(io.TextIOWrapper):
    """sys.stdout for one command: the first write error is kept, not raised,
    and output after it is discarded.  A reader that went away (EPIPE) or a
    full disk must not turn a device's result into a device error; output
    that could not be delivered (a full disk, standard output closed) is
    reported by remove()."""

    lost = None
    closed_stdout = None

    @classmethod
    def install(cls):
        out = sys.stdout
        if out is None:
            closed = _ClosedStdout()
            guard = cls(io.BufferedWriter(closed), encoding="utf-8",
                        errors="surrogateescape")
            guard.closed_stdout = closed
        elif getattr(out, "buffer", None) is None:
            return None
        else:
            out.flush()
            guard = cls(out.buffer, encoding=out.encoding, errors=out.errors,
                        line_buffering=out.line_buffering)
        guard.original = out
        sys.stdout = guard
        return guard

    def write(self, text):
        if self.lost is None:
            try:
                return super().write(text)
            except OSError as exc:
                self._lose(exc)
        return len(text)

    def flush(self):
        if self.lost is None:
            try:
                super().flush()
            except OSError as exc:
                self._lose(exc)

    def _lose(self, exc):
        self.lost = exc
        # Bytes still buffered would fail again at exit: send them nowhere.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(devnull, self.buffer.fileno())
            os.close(devnull)

    def remove(self):
        """Put the real stdout back; the first write error, or None."""
        import errno

        self.flush()
        sys.stdout = self.original
        with contextlib.suppress(ValueError):
            self.detach()
        if self.lost is None and self.closed_stdout is not None and \
                self.closed_stdout.written:
            self.lost = OSError(errno.EBADF, "standard output is closed")
        return self.lost


@click.group(cls=BlkcacheGroup, context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="blkcache",
                      message="%(prog)s, version %(version)s", help="Show the version and exit.")
def cli():
    """Drop and verify the page cache of block devices.

    Before a migrated guest reads its shared volume, the destination host's
    page cache must hold no stale page of it: `blkcache drop DEVICE` writes
    back dirty pages, drops the cache and verifies that it is empty.
    DEVICE is a block device or a regular file (an image on shared storage).
    """


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@range_options
@click.option("-b", "--bytes", "in_bytes", is_flag=True, help="Print sizes in bytes.")
@click.option("-n", "--noheadings", is_flag=True, help="Do not print a header line.")
@click.option("--holders", is_flag=True,
              help="Also list who holds each device open: processes (pid, command, fds, "
                   "mappings), mounts and stacked devices (sysfs holders).")
@click.option("--map", "show_map", is_flag=True,
              help="Also draw where the cached pages are: 64 columns, ' ' none, 'o' part, "
                   "'O' all cached (like vmtouch -v).")
@click.option("-r", "--recursive", is_flag=True,
              help="Also each device's partitions, the devices below it (a partition's "
                   "disk, sysfs slaves) and above it (sysfs holders), each on its own row "
                   "with its RELATION.")
@output_options
def status(devices, offset, length, interface, in_bytes, noheadings, holders, show_map,
           recursive, as_json):
    """Show how much of each DEVICE is in the page cache.

    One row per device, like fincore(1): RES (bytes cached), PAGES (pages
    cached), SIZE (of the range), DIRTY and WRITEBACK (pages; '-' where
    mincore(2) answered, which does not tell).  '?' means the kernel will
    not tell this user (exit 3).  JSON sizes are always in bytes.

    Each partition and stacked device has a page cache of its own: see
    --recursive (without it, one line on standard error names the related
    devices not checked).  The cache lives only while someone holds the
    device open: see --holders.
    """
    from . import exitcodes

    def action(target, label):
        state = target.status(offset, length, interface)
        extra = status_extras(target, state, holders, show_map, interface, as_json)
        return (state, extra), exitcodes.for_state(state)

    records, code, devs = run_targets(devices, action, recursive, offset, length)
    if as_json:
        emit_json("devices", [({**s.to_dict(), **extra}, rel) for (s, extra), rel in records],
                  devs)
        return code
    if records:
        relations = [devs.relation(rel) for _, rel in records] if recursive else None
        click.echo(render_table([s for (s, _), _ in records], in_bytes, noheadings,
                                relations))
        render_status_extras([record for record, _ in records])
    devs.tell()
    return code


def render_table(states, in_bytes=False, noheadings=False, relations=None):
    """fincore-like rows; with ``relations`` (--recursive), a RELATION column
    before DEVICE."""
    from .sizes import format_size

    def size(value):
        if value is None:
            return "?"
        return str(value) if in_bytes else format_size(value)

    def pages(state, value):
        if not state.exact:
            return "?"
        return "-" if value is None else str(value)

    header = ("RES", "PAGES", "SIZE", "DIRTY", "WRITEBACK")
    rows = [(size(s.cached_bytes), pages(s, s.cached), size(s.length),
             pages(s, s.dirty), pages(s, s.writeback)) for s in states]
    if relations is not None:
        header += ("RELATION",)
        rows = [row + (rel,) for row, rel in zip(rows, relations)]
    rows = [row + (display(s.path),) for row, s in zip(rows, states)]
    if not noheadings:
        rows.insert(0, header + ("DEVICE",))
    last = len(header)
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    return "\n".join(" ".join(cell.rjust(w) if i < 5 else cell.ljust(w)
                              for i, (cell, w) in enumerate(zip(row, widths)))
                     + " " + row[last] for row in rows)


def drop_line(result, label=None):
    from .sizes import format_size

    before, after = result.before, result.after
    method = {"ioctl": "BLKFLSBUF", "fadvise": "posix_fadvise",
              "helper": "BLKFLSBUF via blkcache-flush"}.get(result.method, result.method)
    name = display(result.path) if label is None else label
    if after.cached is None:
        return (f"{name}: dropped with {method}; the kernel will not tell "
                "this user whether pages remain (unknown)")
    text = (f"{name}: {_count(before.cached)} -> {after.cached} pages cached "
            f"({format_size(after.page_size * (result.dropped or 0))} dropped with {method}, "
            f"{result.attempts} attempt{'s' if result.attempts != 1 else ''})")
    if after.cached:
        text += ("; pages remain: mapped pages (mmap), pages held by a mounted file system "
                 "and pages under I/O survive a drop")
    return text + beyond_end_note(before)


def beyond_end_note(state):
    """Mention pages cached past the end of a device that shrank."""
    if not state.beyond_end:
        return ""
    return (f" ({state.beyond_end} of them past the end of the device, which shrank: "
            "stale if it grows again)")


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@range_options
@click.option("--method", type=click.Choice(["auto", "ioctl", "helper", "fadvise"]),
              default="auto", show_default=True,
              help="ioctl: BLKFLSBUF (whole device, needs CAP_SYS_ADMIN); helper: "
                   "BLKFLSBUF through the setcap helper blkcache-flush; fadvise: "
                   "posix_fadvise(DONTNEED), no privilege; auto: ioctl, else helper, "
                   "else fadvise with a warning (see 'blkcache doctor').")
@click.option("--expect-clean", is_flag=True,
              help="Migration destination: if any page is dirty or under write-back, "
                   "flush nothing, drop nothing and exit 4.")
@click.option("--retries", type=click.IntRange(0, 20), default=6, show_default=True,
              help="Retries, with a growing pause, for pages busy under I/O.")
@click.option("--discard-failed", is_flag=True,
              help="Drop even a device whose earlier write-back failed (recorded in "
                   "/run/blkcache): its cached pages, maybe the only copy, are lost.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-r", "--recursive", is_flag=True,
              help="Also drop each device's partitions, the devices below it (a "
                   "partition's disk, sysfs slaves) and above it (sysfs holders).")
@output_options
def drop(devices, offset, length, interface, method, expect_clean, retries, discard_failed,
         quiet, recursive, as_json):
    """Write back, drop and verify the page cache of each DEVICE.

    Dirty pages are written back first (fdatasync); if that fails nothing is
    dropped and the exit status is 5.  Then BLKFLSBUF or posix_fadvise drops
    the cache, and a status check verifies it: pages that remain (mapped, or
    busy after RETRIES tries) give exit status 1.
    """
    from . import exitcodes

    def action(target, label):
        result = target.drop(offset, length, method, expect_clean, retries, interface,
                             discard_failed)
        if result.warning and not quiet:
            error(f"warning: {display(result.path)}: {result.warning}")
        if not quiet and not as_json:
            click.echo(drop_line(result, label))
        return result, exitcodes.for_drop(result)

    results, code, devs = run_targets(devices, action, recursive, offset, length)
    if as_json:
        emit_json("devices", [(r.to_dict(), rel) for r, rel in results], devs)
    else:
        devs.tell(quiet)
    return code


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@range_options
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--coherence", is_flag=True,
              help="Instead: compare every cached page with the bytes on the device "
                   "(O_DIRECT) and report stale ranges; exit 1 if any page is stale. "
                   "Adds no page to the cache and never writes.")
@click.option("-r", "--recursive", is_flag=True,
              help="Also each device's partitions, the devices below it (a "
                   "partition's disk, sysfs slaves) and above it (sysfs holders).")
@output_options
def verify(devices, offset, length, interface, quiet, coherence, recursive, as_json):
    """Check that no page of each DEVICE is cached.

    Exit status 0 only when the kernel says the range holds no cached page;
    1 when pages are resident; 3 when the kernel will not tell this user
    (cachestat EPERM, restricted mincore): never a false "clean".

    With --coherence, cached pages are expected and fine as long as they
    hold the bytes on the device: every resident page (mincore map, 128 MiB
    windows) is compared with an O_DIRECT read.  Stale ranges are listed;
    dirty or write-back pages are not compared (they legitimately differ,
    and a direct read would write them back) and are listed apart; pages
    evicted during the scan are counted as not compared.  Exit 0 coherent,
    1 stale, 4 dirty pages (none stale), 3 unknown (needs cachestat(2) and
    a kernel that tells this user).
    """
    from . import exitcodes
    from .sizes import format_size

    if coherence:
        return verify_coherence(devices, offset, length, quiet, recursive, as_json)

    def action(target, label):
        check = target.verify(offset, length, interface)
        state = check.state
        if not quiet and not as_json:
            if check.verdict == "unknown":
                click.echo(f"{label}: unknown: {state.reason}")
            else:
                click.echo(f"{label}: {check.verdict}: {state.cached} of "
                           f"{state.pages} pages ({format_size(state.cached_bytes)}) cached"
                           + beyond_end_note(state))
        return check, exitcodes.for_verdict(check.verdict)

    checks, code, devs = run_targets(devices, action, recursive, offset, length)
    if as_json:
        emit_json("devices", [(c.to_dict(), rel) for c, rel in checks], devs)
    else:
        devs.tell(quiet)
    return code


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.option("--size", type=SIZE, default="256M", show_default=True,
              help="Size of the scratch volume.")
def demo(size):
    """Show the migration hazard and its remedy on scratch loop devices.

    Needs root.  Attaches two loop devices to one sparse file in /var/tmp
    (two hosts on shared storage), caches a page on the "destination", writes
    new data on the "source", shows the stale read, drops and verifies the
    destination's cache, shows the fresh read, then detaches everything.
    """
    from . import demo as demo_mod
    from . import exitcodes
    from .errors import BlkcacheError, UsageError

    try:
        for step, detail in demo_mod.run(size):
            click.echo(f"{step:>8}: {detail}")
    except (OSError, BlkcacheError) as exc:
        error(describe(exc))
        return exitcodes.for_error(exc) if isinstance(exc, UsageError) else exitcodes.FAILURE
    return exitcodes.OK


# ---- migration toolkit: --recursive, --holders, --map, --coherence, watch, hook ----


class Progress:
    """A click progress bar on standard error for scans that run long.

    Nothing is drawn unless ``enabled`` (not --json), standard error is a
    terminal, and the scan has already run for ``delay`` seconds: short
    scans and piped runs stay silent.  Call it as progress(done, total).
    """

    def __init__(self, label, enabled=True, delay=1.0, file=None):
        import time

        self.label = label
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and _isatty(self.file)
        self.delay = delay
        self.clock = time.monotonic
        self.started = self.clock()
        self.bar = None
        self.done = 0

    def __call__(self, done, total):
        if not self.enabled:
            return
        if self.bar is None:
            if self.clock() - self.started < self.delay:
                return
            self.bar = click.progressbar(length=max(total, 1), label=self.label,
                                         file=self.file)
            self.bar.__enter__()
        self.bar.update(max(0, done - self.done))
        self.done = done

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _isatty(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def expand_devices(paths):
    """(Related list, codes): each path and its related devices (stack.expand).

    Related devices without a node in /dev get one error line and code 5.
    """
    from . import exitcodes, stack

    out, codes = [], []
    for rel in stack.expand_all(paths):
        if rel.missing:
            error(f"{display(rel.name)} ({rel.rdev}, {rel.relation} of "
                  f"{display(rel.parent)}): no device node in /dev; not handled")
            codes.append(exitcodes.FAILURE)
        else:
            out.append(rel)
    return out, codes


def status_extras(target, state, holders, show_map, interface, as_json):
    """The --holders and --map parts of one status record (a dict)."""
    extra = {}
    if holders:
        from .holders import holders_of

        extra["holders"] = holders_of(target)
    if show_map:
        from .api import Range
        from .resmap import residency_map

        with Progress(f"mapping {display(target.path)}", enabled=not as_json) as progress:
            extra["map"] = residency_map(target, rng=Range(state.offset, state.length),
                                         interface=interface, progress=progress)
    if as_json:
        return {key: value.to_dict() for key, value in extra.items()}
    return extra


def render_status_extras(records):
    from .sizes import format_size

    for state, extra in records:
        name = display(state.path)
        if "map" in extra:
            rmap = extra["map"]
            per = rmap.length // max(1, len(rmap.bucket_pages))
            click.echo(f"{name}: {rmap.render()} {format_size(rmap.length)}, "
                       f"{format_size(per)} per column")
        if "holders" in extra:
            held = extra["holders"]
            lines = [h.describe() for h in held.processes + held.mounts + held.stacked]
            if held.rdev is None:
                lines = ["holders are listed for block devices only"]
            elif not lines:
                lines = ["no other holder (the cache goes when the last opener closes it)"]
            for line in lines:
                click.echo(f"{name}: {display(line)}")
            if held.unreadable:
                click.echo(f"{name}: {held.unreadable} process(es) could not be inspected "
                           "(permission)")


def coherence_lines(report, label=None):
    """Text lines for one coherence report."""
    from .sizes import format_size

    name = display(report.path) if label is None else label
    if report.verdict == "unknown":
        return [f"{name}: unknown: {report.reason}"]
    head = {"coherent": f"coherent: {report.compared} cached pages match the device",
            "stale": f"stale: {report.stale} of {report.compared} compared pages differ "
                     "from the device",
            "dirty": f"dirty: {report.compared} cached pages match the device, "
                     f"{report.dirty} dirty pages could not be compared"}[report.verdict]
    lines = [f"{name}: {head} ({report.resident} resident, {report.dirty} dirty and "
             f"{report.vanished} evicted not compared)"]
    for kind, ranges in (("stale", report.stale_ranges), ("dirty", report.dirty_ranges),
                         ("evicted", report.vanished_ranges)):
        for off, length in ranges:
            lines.append(f"  {kind} offset {off} length {length} "
                         f"({length // report.page_size} pages, {format_size(length)})")
    if report.truncated:
        lines.append("  (more ranges not listed; counts are exact)")
    return lines


def verify_coherence(devices, offset, length, quiet, recursive, as_json):
    from . import exitcodes
    from .coherence import check

    def action(target, label):
        with Progress(f"comparing {display(target.path)}", enabled=not as_json) as progress:
            report = check(target, offset, length, progress=progress)
        if not quiet and not as_json:
            for line in coherence_lines(report, label):
                click.echo(line)
        return report, exitcodes.for_coherence(report)

    reports, code, devs = run_targets(devices, action, recursive, offset, length)
    if as_json:
        emit_json("devices", [(r.to_dict(), rel) for r, rel in reports], devs)
    else:
        devs.tell(quiet)
    return code


class _Stop(Exception):
    """Raised by the SIGTERM handler of watch."""


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("device", metavar="DEVICE")
@range_options
@click.option("--interval", type=click.FloatRange(0.01, 3600), default=0.5, show_default=True,
              help="Seconds between samples.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Stop after this many samples (not lines).")
@click.option("--until-empty", is_flag=True,
              help="Stop when no page is cached (exit 1 if stopped otherwise with pages "
                   "still cached).")
@click.option("--timeout", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("-b", "--bytes", "in_bytes", is_flag=True, help="Print sizes in bytes.")
@click.option("-n", "--noheadings", is_flag=True, help="Do not print a header line.")
@click.option("-J", "--json", "as_json", is_flag=True,
              help="One JSON object per line (JSON Lines).")
def watch(device, offset, length, interface, interval, count, until_empty, timeout,
          in_bytes, noheadings, as_json):
    """Print a line whenever DEVICE's cached, dirty or writeback pages change.

    Samples every INTERVAL seconds; the first sample is always printed.
    Stops on --count, --until-empty, --timeout, or SIGINT/SIGTERM (exit 0).
    For watching a destination host during the migration window.  Lines:
    TIME (local, ms), RES, PAGES, DIRTY, WRITEBACK ('-' where mincore(2)
    answered, '?' where the kernel will not tell: then it stops, exit 3).
    """
    import signal
    import time as time_mod

    from . import api, exitcodes
    from .errors import BlkcacheError
    from .sizes import format_size
    from .watch import watch as watch_gen

    def on_term(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    last = None
    try:
        with api.Target(device) as target:
            if not as_json and not noheadings:
                click.echo(f"{'TIME':>12} {'RES':>7} {'PAGES':>10} {'DIRTY':>8} "
                           f"{'WRITEBACK':>9} DEVICE")
            for sample in watch_gen(target, interval, count, until_empty, timeout,
                                    offset, length, interface):
                last = sample
                if as_json:
                    click.echo(json.dumps(sample.to_dict()))
                    continue
                s = sample.state
                stamp = time_mod.strftime("%H:%M:%S", time_mod.localtime(sample.time))
                stamp += f".{int(sample.time * 1000) % 1000:03d}"

                def num(value, exact=s.exact):
                    return "?" if not exact else ("-" if value is None else str(value))
                res = "?" if s.cached is None else (
                    str(s.cached_bytes) if in_bytes else format_size(s.cached_bytes))
                click.echo(f"{stamp:>12} {res:>7} {num(s.cached):>10} {num(s.dirty):>8} "
                           f"{num(s.writeback):>9} {display(s.path)}")
    except (KeyboardInterrupt, _Stop):
        return exitcodes.OK
    except (OSError, BlkcacheError) as exc:
        error(describe(exc))
        return exitcodes.for_error(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return exitcodes.for_watch(last, until_empty)


HOOK_HELP = """\b
Hooks shipped with blkcache:
  libvirt   /etc/libvirt/hooks/qemu script for migration destinations:
            on 'migrate begin', 'prepare begin', 'start begin' and
            'started begin' it reads the domain XML on stdin and runs
            'blkcache verify --coherence --recursive' then
            'blkcache drop --expect-clean --recursive' on the domain's
            <disk type='block'> sources; every other event: exit 0.
Install:  blkcache hook libvirt > /etc/libvirt/hooks/qemu
          chmod 755 /etc/libvirt/hooks/qemu"""


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=HOOK_HELP)
@click.argument("kind", type=click.Choice(["libvirt"]))
@click.option("--path", "show_path", is_flag=True,
              help="Print where the script is installed instead of its text.")
def hook(kind, show_path):
    """Print a ready hook script (KIND: libvirt) to install by hand."""
    from . import exitcodes, hooks

    path = hooks.script_path(kind)
    if show_path:
        click.echo(path)
    else:
        with open(path, encoding="utf-8") as f:
            click.echo(f.read(), nl=False)
    return exitcodes.OK


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("devices", nargs=-1, metavar="[DEVICE]...")
@click.option("--helper-path", is_flag=True,
              help="Print only the path of the setcap helper blkcache-flush (for "
                   "setcap cap_sys_admin+p \"$(blkcache doctor --helper-path)\").")
@output_options
def doctor(devices, helper_path, as_json):
    """Check what blkcache can do here, as this user, and how to fix it.

    Reports the kernel, whether cachestat(2) exists, this process's effective
    capabilities, the helper blkcache-flush and its file capability, the
    method 'drop' will use, and for each DEVICE whether status and verify
    will get counts from the kernel as this user or only "unknown".  Each
    problem comes with a fix.  Exit status 0 once the report is printed
    (problems or not), 2 on bad usage, 5 when --helper-path finds no helper.
    """
    from . import exitcodes

    if helper_path:
        from . import privilege

        path = privilege.helper_path()
        if not privilege.helper_status(path).installed:
            error(f"{display(path)}: {privilege.HELPER_NAME} is not installed")
            return exitcodes.FAILURE
        click.echo(path)
        return exitcodes.OK
    from .doctor import doctor as run_doctor

    report = run_doctor(devices)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_doctor(report))
    return exitcodes.OK


def render_doctor(report):
    yes = {True: "yes", False: "no", None: "unknown"}
    caps = report.effective_caps
    if not caps:
        cap_text = "none"
    elif len(caps) <= 4:
        cap_text = ", ".join(caps)
    else:
        cap_text = f"{len(caps)} capabilities"
    cap_text += (f" (cap_sys_admin: {yes[report.cap_sys_admin]}, "
                 f"cap_fowner: {yes[report.cap_fowner]})")
    helper = report.helper
    if helper.installed is False:
        helper_text = "not installed"
    elif helper.usable:
        helper_text = f"{helper.capabilities}, usable"
    else:
        helper_text = f"{helper.capabilities or 'no file capability'}, not usable"
    lines = [
        f"kernel:        Linux {report.kernel}, cachestat(2) "
        + {True: "available", False: "missing (mincore fallback)",
           None: "unknown"}[report.cachestat_available]
        + ", disk sequence numbers "
        + {True: "yes", False: "no (failure records block by major:minor)",
           None: "unknown"}[report.diskseq],
        f"user:          {display(report.user)} (uid {report.uid}), "
        f"no_new_privs: {yes[report.no_new_privs]}",
        f"capabilities:  {cap_text}",
        f"helper:        {display(helper.path)} ({helper_text})",
        f"drop method:   {report.drop_method.method}: {report.drop_method.reason}",
    ]
    for dev in report.devices:
        if not dev.opened:
            lines.append(f"device:        {display(dev.path)}: cannot use: {dev.error}")
            continue
        verdict = "counts" if dev.answers else "\"unknown\" (exit 3)"
        lines.append(f"device:        {display(dev.path)}: {dev.kind}; cachestat "
                     f"{dev.cachestat}, mincore {dev.mincore}: status/verify give "
                     f"{verdict}; drop uses {dev.drop_method}")
    lines.append(f"failures:      {len(report.failures) or 'none'} on record in "
                 f"{display(report.state_dir)}")
    for failure in report.failures:
        lines.append(f"  - {failure_line(failure)}")
    if report.problems:
        lines.append("problems:")
        for problem in report.problems:
            lines.append(f"  - {display(problem.subject)}: {problem.problem}")
            if problem.fix:
                lines.append(f"    fix: {problem.fix}")
    else:
        lines.append("problems:      none")
    if helper.installed and not helper.cap_sys_admin:
        lines.append("To let users without CAP_SYS_ADMIN drop with BLKFLSBUF, run as root:")
        lines.append(f"  {report.setcap_command}")
    return "\n".join(lines)


# ---- failed write-back records (issue 10): blkcache failures ----------------


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.option("--clear", "clear", multiple=True, metavar="DEVICE",
              help="Forget the failed write-back on record for DEVICE (its current "
                   "instance); drops of it then go ahead.  Repeatable.")
@click.option("--prune", is_flag=True,
              help="Remove the stale records: their device instance is gone (detached, "
                   "re-attached), so they block nothing.")
@output_options
def failures(clear, prune, as_json):
    """List the failed write-backs on record, or clear them without a drop.

    A failed write-back is recorded per device instance (major:minor and the
    kernel's disk sequence number); while a record is live, 'drop' of that
    device refuses (exit 5).  STATE: live (the instance exists: drops
    refuse), stale (it is gone: blocks nothing; see --prune), unknown (no
    disk sequence number to tell: it blocks every device with that number).
    """
    from . import exitcodes
    from . import failures as records_mod
    from .errors import BlkcacheError

    try:
        if clear or prune:
            done = records_mod.clear_paths(clear) + \
                (records_mod.prune() if prune else [])
            if as_json:
                click.echo(json.dumps({"removed": [f.to_dict() for f in done]}, indent=2))
            else:
                for failure in done:
                    click.echo(f"removed {display(failure.record)} ({display(failure.path)}, "
                               f"{failure.state or 'cleared'})")
                if not done:
                    click.echo("no record removed")
            return exitcodes.OK
        found = records_mod.records()
    except (OSError, BlkcacheError) as exc:
        error(describe(exc))
        return exitcodes.for_error(exc)
    if as_json:
        click.echo(json.dumps({"directory": records_mod.state_dir(),
                               "failures": [f.to_dict() for f in found]}, indent=2))
    elif found:
        click.echo(render_failures(found))
    else:
        click.echo(f"no failed write-back on record ({display(records_mod.state_dir())})")
    return exitcodes.OK


def render_failures(found):
    """A table of failure records: STATE WHEN ERROR PAGES RDEV DISKSEQ PATH."""
    import errno as errno_mod
    import time

    rows = [("STATE", "WHEN", "ERROR", "PAGES", "RDEV", "DISKSEQ", "PATH")]
    for f in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.when)) if f.when else "?"
        seq = f.key.seq if f.key is not None and f.key.seq is not None else "-"
        path = display(f.path) if f.problem is None else \
            f"{display(f.record)} (cannot be read: {display(f.problem)})"
        rows.append((f.state or "?", when, errno_mod.errorcode.get(f.errno, str(f.errno)),
                     "?" if f.dirty is None else str(f.dirty),
                     f.key.rdev if f.key is not None else "?", str(seq), path))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join(" ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " " + row[6]
                     for row in rows)


def failure_line(failure):
    """One record, for doctor: device, when, errno, pages, state."""
    import time

    key = failure.key
    device = f"{display(failure.path)} ({key.rdev if key else '?'}"
    device += f", diskseq {key.seq})" if key is not None and key.seq is not None else ")"
    if failure.problem is not None:
        head = f"{display(failure.record)}: cannot be read ({display(failure.problem)})"
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.when))
        head = (f"{device}: {stamp}, {os.strerror(failure.errno)}, "
                f"{_count(failure.dirty)} pages were dirty")
    state = {"live": "live: drop refuses until --discard-failed",
             "stale": "stale: that device instance is gone, it blocks nothing "
                      "(blkcache failures --prune)",
             "unknown": "unknown: no disk sequence number to tell; it blocks"}
    return f"{head}; {state.get(failure.state, failure.state)}"


def main(args=None, prog_name="blkcache"):
    cli.main(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main()
