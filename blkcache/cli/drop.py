"""blkcache drop"""

import click

from ..constants import DEFAULT_RETRIES, MAX_RETRIES, METHODS
from . import options, output, render


@click.command("drop", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@options.devices()
@options.apply(options.RANGE)
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="ioctl: BLKFLSBUF (whole device, needs CAP_SYS_ADMIN); helper: "
                   "BLKFLSBUF through the setcap helper blkcache-flush; fadvise: "
                   "posix_fadvise(DONTNEED), no privilege; auto: ioctl, else helper, "
                   "else fadvise with a warning (see 'blkcache doctor').")
@click.option("--expect-clean", is_flag=True,
              help="Migration destination: if any page is dirty or under write-back, "
                   "flush nothing, drop nothing and exit 4.")
@click.option("--retries", type=click.IntRange(0, MAX_RETRIES), default=DEFAULT_RETRIES,
              show_default=True,
              help="Retries, with a growing pause, for pages busy under I/O.")
@click.option("--discard-failed", is_flag=True,
              help="Drop even a device whose earlier write-back failed (recorded in "
                   "/run/blkcache): its cached pages, maybe the only copy, are lost.")
@options.apply(options.QUIET)
@options.apply(options.RECURSIVE, options.JSON)
def command(devices, offset, length, interface, method, expect_clean, retries,
            discard_failed, quiet, recursive, as_json):
    """Write back, drop and verify the page cache of each DEVICE.

    Dirty pages are written back first (fdatasync); if that fails nothing is
    dropped and the exit status is 5.  Then BLKFLSBUF or posix_fadvise drops
    the cache, and a status check verifies it: pages that remain (mapped, or
    busy after RETRIES tries) give exit status 1.
    """
    from .. import api

    def action(target):
        return target.drop(offset, length, method, expect_clean, retries, interface,
                           discard_failed)

    def report(outcome):
        output.report_error(outcome)
        result = outcome.result
        if result is not None and result.warning and not quiet:
            output.error(render.drop_warning(result))
        if result is not None and not quiet and not as_json:
            click.echo(render.drop_line(result, outcome.relation))

    results = api.run(devices, action, recursive, report, offset=offset, length=length)
    return output.finish(results, recursive, as_json, quiet)
