"""The blkcache command: a thin shell over blkcache.api.

Each command opens its devices through the API, renders the results and
returns an exit code from blkcache.exitcodes.  Only click is imported at
start-up; the API (and its native module) is imported by the commands.
"""

import functools
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
  0   success; verify: no page of the range is cached
  1   pages remain cached (verify found some, drop could not drop all)
  2   usage error or bad input (option, size, range, path, file type)
  3   unknown: the kernel will not tell this user; never "clean"
  4   drop --expect-clean refused: dirty pages found, nothing done
  5   failure: permission denied, I/O error, failed write-back, method
      unavailable, device gone
  32  several devices: all failed;  64  several devices: some failed"""


def display(path):
    """A path printable on one line: undecodable bytes and controls escaped."""
    if path is None:
        return ""
    text = path if isinstance(path, str) else str(path)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error(message):
    click.echo(f"blkcache: {message}", err=True)


def describe(exc):
    """One line for an exception raised by the API."""
    from .errors import BlkcacheError, MethodUnavailableError, WritebackError

    path = getattr(exc, "path", None) if isinstance(exc, BlkcacheError) else exc.filename
    where = f"{display(path)}: " if path else ""
    if isinstance(exc, WritebackError):
        dirty = exc.before.dirty if exc.before is not None else None
        still = exc.after.dirty if exc.after is not None else None
        return (f"{where}write-back failed: {exc.strerror}; {_count(dirty)} pages were dirty, "
                f"{_count(still)} still dirty; nothing was dropped (the cached pages may "
                "be the only copy of that data)")
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


def run_targets(paths, action):
    """Open every path, run ``action(target)`` on each, combine exit codes.

    ``action`` returns (record, code).  API errors become one line on
    stderr; bad input on any path stops before anything is done.
    """
    import contextlib

    from . import api, exitcodes
    from .errors import BlkcacheError

    records, codes = [], []
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
        sys.exit(code if isinstance(code, int) else 0)


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
@output_options
def status(devices, offset, length, interface, in_bytes, noheadings, as_json):
    """Show how much of each DEVICE is in the page cache.

    One row per device, like fincore(1): RES (bytes cached), PAGES (pages
    cached), SIZE (of the range), DIRTY and WRITEBACK (pages; '-' where
    mincore(2) answered, which does not tell).  '?' means the kernel will
    not tell this user (exit 3).  JSON sizes are always in bytes.
    """
    from . import exitcodes

    def action(target):
        state = target.status(offset, length, interface)
        return state, exitcodes.for_state(state)

    states, code = run_targets(devices, action)
    if as_json:
        emit_json("devices", [s.to_dict() for s in states])
    elif states:
        click.echo(render_table(states, in_bytes, noheadings))
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
    method = {"ioctl": "BLKFLSBUF", "fadvise": "posix_fadvise"}.get(result.method,
                                                                    result.method)
    if after.cached is None:
        return (f"{display(result.path)}: dropped with {method}; the kernel will not tell "
                "this user whether pages remain (unknown)")
    text = (f"{display(result.path)}: {_count(before.cached)} -> {after.cached} pages cached "
            f"({format_size(after.page_size * (result.dropped or 0))} dropped with {method}, "
            f"{result.attempts} attempt{'s' if result.attempts != 1 else ''})")
    if after.cached:
        text += ("; pages remain: mapped pages (mmap) and pages under I/O survive a drop")
    return text


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@range_options
@click.option("--method", type=click.Choice(["auto", "ioctl", "fadvise"]), default="auto",
              show_default=True,
              help="ioctl: BLKFLSBUF (whole device, needs CAP_SYS_ADMIN); fadvise: "
                   "posix_fadvise(DONTNEED), no privilege; auto: ioctl when allowed.")
@click.option("--expect-clean", is_flag=True,
              help="Migration destination: if any page is dirty or under write-back, "
                   "flush nothing, drop nothing and exit 4.")
@click.option("--retries", type=click.IntRange(0, 20), default=6, show_default=True,
              help="Retries, with a growing pause, for pages busy under I/O.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@output_options
def drop(devices, offset, length, interface, method, expect_clean, retries, quiet, as_json):
    """Write back, drop and verify the page cache of each DEVICE.

    Dirty pages are written back first (fdatasync); if that fails nothing is
    dropped and the exit status is 5.  Then BLKFLSBUF or posix_fadvise drops
    the cache, and a status check verifies it: pages that remain (mapped, or
    busy after RETRIES tries) give exit status 1.
    """
    from . import exitcodes

    def action(target):
        result = target.drop(offset, length, method, expect_clean, retries, interface)
        if not quiet and not as_json:
            click.echo(drop_line(result))
        return result, exitcodes.for_drop(result)

    results, code = run_targets(devices, action)
    if as_json:
        emit_json("devices", [r.to_dict() for r in results])
    return code


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_STATUS_HELP)
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@range_options
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@output_options
def verify(devices, offset, length, interface, quiet, as_json):
    """Check that no page of each DEVICE is cached.

    Exit status 0 only when the kernel says the range holds no cached page;
    1 when pages are resident; 3 when the kernel will not tell this user
    (cachestat EPERM, restricted mincore): never a false "clean".
    """
    from . import exitcodes
    from .sizes import format_size

    def action(target):
        check = target.verify(offset, length, interface)
        state = check.state
        if not quiet and not as_json:
            if check.verdict == "unknown":
                click.echo(f"{display(state.path)}: unknown: {state.reason}")
            else:
                click.echo(f"{display(state.path)}: {check.verdict}: {state.cached} of "
                           f"{state.pages} pages ({format_size(state.cached_bytes)}) cached")
        return check, exitcodes.for_verdict(check.verdict)

    checks, code = run_targets(devices, action)
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
    from .errors import BlkcacheError

    try:
        for step, detail in demo_mod.run(size):
            click.echo(f"{step:>8}: {detail}")
    except (OSError, BlkcacheError) as exc:
        error(describe(exc))
        return exitcodes.FAILURE
    return exitcodes.OK


def main(args=None, prog_name="blkcache"):
    cli.main(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main()
