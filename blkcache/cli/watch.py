"""blkcache watch"""

import click

from . import options, output, render


class _Stop(Exception):
    """Raised by the SIGTERM handler of watch."""


def _stop(signum, frame):
    raise _Stop()


@click.command("watch", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@click.argument("device", metavar="DEVICE")
@options.apply(options.RANGE)
@click.option("--interval", type=click.FloatRange(0.01, 3600), default=0.5, show_default=True,
              help="Seconds between samples.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Stop after this many samples (not lines).")
@click.option("--until-empty", is_flag=True,
              help="Stop when no page is cached (exit 1 if stopped otherwise with pages "
                   "still cached).")
@click.option("--timeout", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Stop after this many seconds.")
@options.apply(options.SIZES)
@click.option("-J", "--json", "as_json", is_flag=True,
              help="One JSON object per line (JSON Lines).")
def command(device, offset, length, interface, interval, count, until_empty, timeout,
            in_bytes, noheadings, as_json):
    """Print a line whenever DEVICE's cached, dirty or writeback pages change.

    Samples every INTERVAL seconds; the first sample is always printed.
    Stops on --count, --until-empty, --timeout, or SIGINT/SIGTERM (exit 0).
    For watching a destination host during the migration window.  Lines:
    TIME (local, ms), RES, PAGES, DIRTY, WRITEBACK ('-' where mincore(2)
    answered, '?' where the kernel will not tell: then it stops, exit 3).
    """
    import signal

    from .. import api, exitcodes
    from ..errors import BlkcacheError
    from ..watch import watch

    previous = signal.signal(signal.SIGTERM, _stop)
    last = None
    try:
        with api.Target(device) as target:
            if not as_json and not noheadings:
                click.echo(render.WATCH_HEADER)
            for last in watch(target, interval, count, until_empty, timeout, offset, length,
                              interface):
                if as_json:
                    output.emit_json(last.to_dict(), indent=None)
                else:
                    click.echo(render.watch_line(last, in_bytes))
    except (KeyboardInterrupt, _Stop):
        return exitcodes.OK
    except (OSError, BlkcacheError) as exc:
        output.error(render.describe(exc))
        return exitcodes.for_error(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return exitcodes.for_watch(last, until_empty)
