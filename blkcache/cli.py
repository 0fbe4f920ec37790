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
      on record: see --discard-failed), method unavailable, device gone
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
    from .errors import BlkcacheError, MethodUnavailableError, WritebackError

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
    if isinstance(exc, MethodUnavailableError):
        return f"{where}{exc.message}" + (f" (fix: {exc.fix})" if exc.fix else "")
    if isinstance(exc, BlkcacheError):
        return f"{where}{exc.message}"
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


def run_targets(paths, action, recursive=False):
    """Open every path, run ``action(target)`` on each, combine exit codes.

    ``action`` returns (record, code).  API errors become one line on
    stderr; bad input on any path stops before anything is done.  With
    ``recursive``, each path is expanded into itself, its partitions and the
    devices below it (see expand_devices).
    """

    from . import api, exitcodes
    from .errors import BlkcacheError

    records, codes = [], []
    if recursive:
        paths, codes = expand_devices(paths)
    with contextlib.ExitStack() as stack:
        try:
            targets = api.open_targets(paths, stack)
        except (OSError, BlkcacheError) as exc:
            error(describe(exc))
            return records, exitcodes.for_error(exc)
        for target in targets:
            try:
                record, code = action(target)
            except (OSError, BlkcacheError) as exc:
                error(describe(exc))
                code = exitcodes.for_error(exc)
                record = None
            if record is not None:
                records.append(record)
            codes.append(code)
    return records, exitcodes.combine(codes)


def emit_json(key, records):
    click.echo(json.dumps({key: records}, indent=2))


class BlkcacheGroup(click.Group):
    """Turns every click error into one 'blkcache: ...' line and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
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


class GuardedStdout(io.TextIOWrapper):
    """sys.stdout for one command: the first write error is kept, not raised,
    and output after it is discarded.  A reader that went away (EPIPE) or a
    full disk must not turn a device's result into a device error."""

    lost = None

    @classmethod
    def install(cls):
        out = sys.stdout
        if getattr(out, "buffer", None) is None:
            return None
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
        self.flush()
        sys.stdout = self.original
        with contextlib.suppress(ValueError):
            self.detach()
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
              help="Also each device's partitions and the devices below it (a partition's "
                   "disk, sysfs slaves), each on its own row.")
@output_options
def status(devices, offset, length, interface, in_bytes, noheadings, holders, show_map,
           recursive, as_json):
    """Show how much of each DEVICE is in the page cache.

    One row per device, like fincore(1): RES (bytes cached), PAGES (pages
    cached), SIZE (of the range), DIRTY and WRITEBACK (pages; '-' where
    mincore(2) answered, which does not tell).  '?' means the kernel will
    not tell this user (exit 3).  JSON sizes are always in bytes.

    Each partition and stacked device has a page cache of its own: see
    --recursive.  The cache lives only while someone holds the device open:
    see --holders.
    """
    from . import exitcodes

    def action(target):
        state = target.status(offset, length, interface)
        extra = status_extras(target, state, holders, show_map, interface, as_json)
        return (state, extra), exitcodes.for_state(state)

    records, code = run_targets(devices, action, recursive)
    if as_json:
        emit_json("devices", [{**s.to_dict(), **extra} for s, extra in records])
    elif records:
        click.echo(render_table([s for s, _ in records], in_bytes, noheadings))
        render_status_extras(records)
    return code


def render_table(states, in_bytes=False, noheadings=False):
    from .sizes import format_size

    def size(value):
        if value is None:
            return "?"
        return str(value) if in_bytes else format_size(value)

    def pages(state, value):
        if not state.exact:
            return "?"
        return "-" if value is None else str(value)

    header = ("RES", "PAGES", "SIZE", "DIRTY", "WRITEBACK", "DEVICE")
    rows = [(size(s.cached_bytes), pages(s, s.cached), size(s.length),
             pages(s, s.dirty), pages(s, s.writeback), display(s.path)) for s in states]
    if not noheadings:
        rows.insert(0, header)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(" ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " " + row[5]
                     for row in rows)


def drop_line(result):
    from .sizes import format_size

    before, after = result.before, result.after
    method = {"ioctl": "BLKFLSBUF", "fadvise": "posix_fadvise",
              "helper": "BLKFLSBUF via blkcache-flush"}.get(result.method, result.method)
    if after.cached is None:
        return (f"{display(result.path)}: dropped with {method}; the kernel will not tell "
                "this user whether pages remain (unknown)")
    text = (f"{display(result.path)}: {_count(before.cached)} -> {after.cached} pages cached "
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
              help="Also drop each device's partitions and the devices below it (a "
                   "partition's disk, sysfs slaves).")
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

    def action(target):
        result = target.drop(offset, length, method, expect_clean, retries, interface,
                             discard_failed)
        if result.warning and not quiet:
            error(f"warning: {display(result.path)}: {result.warning}")
        if not quiet and not as_json:
            click.echo(drop_line(result))
        return result, exitcodes.for_drop(result)

    results, code = run_targets(devices, action, recursive)
    if as_json:
        emit_json("devices", [r.to_dict() for r in results])
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
              help="Also each device's partitions and the devices below it (a "
                   "partition's disk, sysfs slaves).")
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

    def action(target):
        check = target.verify(offset, length, interface)
        state = check.state
        if not quiet and not as_json:
            if check.verdict == "unknown":
                click.echo(f"{display(state.path)}: unknown: {state.reason}")
            else:
                click.echo(f"{display(state.path)}: {check.verdict}: {state.cached} of "
                           f"{state.pages} pages ({format_size(state.cached_bytes)}) cached"
                           + beyond_end_note(state))
        return check, exitcodes.for_verdict(check.verdict)

    checks, code = run_targets(devices, action, recursive)
    if as_json:
        emit_json("devices", [c.to_dict() for c in checks])
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
    """(device paths, codes): each path, its partitions and the devices below.

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
            out.append(rel.path)
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


def coherence_lines(report):
    """Text lines for one coherence report."""
    from .sizes import format_size

    name = display(report.path)
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

    def action(target):
        with Progress(f"comparing {display(target.path)}", enabled=not as_json) as progress:
            report = check(target, offset, length, progress=progress)
        if not quiet and not as_json:
            for line in coherence_lines(report):
                click.echo(line)
        return report, exitcodes.for_coherence(report)

    reports, code = run_targets(devices, action, recursive)
    if as_json:
        emit_json("devices", [r.to_dict() for r in reports])
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
              help="Print only the path of the package's own copy of the setcap "
                   "helper blkcache-flush (what install-helper installs).")
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
    elif helper.trusted is False:
        helper_text = f"{helper.capabilities or 'no file capability'}, not trusted"
    else:
        helper_text = f"{helper.capabilities or 'no file capability'}, not usable"
    lines = [
        f"kernel:        Linux {report.kernel}, cachestat(2) "
        + {True: "available", False: "missing (mincore fallback)",
           None: "unknown"}[report.cachestat_available],
        f"user:          {display(report.user)} (uid {report.uid}), "
        f"no_new_privs: {yes[report.no_new_privs]}",
        f"capabilities:  {cap_text}",
        f"helper:        {display(helper.path)} ({helper_text})",
        *(f"  not used:    {display(c.path)}: {c.why_not}"
          for c in report.helpers if not c.used and c.path != helper.path),
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


# ---- install-helper (issue 11; moves to cli/install_helper.py with the layout) ----


@cli.command("install-helper", context_settings=CONTEXT_SETTINGS)
@click.option("--prefix", default="/usr/local", show_default=True, metavar="PREFIX",
              help="Install as PREFIX/libexec/blkcache/blkcache-flush.")
@click.option("--uninstall", is_flag=True, help="Remove the helper installed there.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
def install_helper(prefix, uninstall, dry_run):
    """Install the setcap helper as a root-owned system file (needs root).

    Copies this package's blkcache-flush to PREFIX/libexec/blkcache/ as
    root:root 0755 with cap_sys_admin+p, atomically (a temporary file in the
    same directory, then rename): unlike a capability set on the package's own
    copy, it survives the next pip install.  Missing directories are created
    root:root 0755; a prefix with a directory that is not root's or is
    writable by group or others is refused, and so is a package copy another
    user could have changed (a user's venv).  drop and doctor look in
    /usr/libexec/blkcache, then /usr/local/libexec/blkcache, then the
    package's own copy.  Exit status 0 done, 2 bad usage, 5 refused or failed.
    """
    from . import exitcodes
    from .errors import BlkcacheError, UsageError
    from .integrations import helper_install

    action = helper_install.uninstall if uninstall else helper_install.install
    try:
        outcome = action(prefix, dry_run=dry_run)
    except (OSError, BlkcacheError) as exc:
        error(describe(exc))
        return exitcodes.for_error(exc) if isinstance(exc, UsageError) else exitcodes.FAILURE
    for step in outcome.steps:
        click.echo(("would " if outcome.dry_run else "") + display(step))
    return exitcodes.OK


def main(args=None, prog_name="blkcache"):
    cli.main(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main()
