"""blkcache verify"""

import click

from . import options, output, render


@click.command("verify", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@options.devices()
@options.apply(options.RANGE, options.QUIET)
@click.option("--coherence", is_flag=True,
              help="Instead: compare every cached page with the bytes on the device "
                   "(O_DIRECT) and report stale ranges; exit 1 if any page is stale. "
                   "Adds no page to the cache and never writes.")
@options.apply(options.RECURSIVE, options.JSON)
def command(devices, offset, length, interface, quiet, coherence, recursive, as_json):
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
    from .. import api

    if coherence:
        from ..coherence import check

        def action(target):
            with output.Progress(f"comparing {render.display(target.path)}",
                                 enabled=not as_json) as progress:
                return check(target, offset, length, progress=progress)
        lines = render.coherence_lines
    else:
        def action(target):
            return target.verify(offset, length, interface)

        def lines(check, rel):
            return [render.verify_line(check, rel)]

    def report(outcome):
        output.report_error(outcome)
        if outcome.result is not None and not quiet and not as_json:
            for line in lines(outcome.result, outcome.relation):
                click.echo(line)

    checks = api.run(devices, action, recursive, report, offset=offset, length=length)
    return output.finish(checks, recursive, as_json, quiet)
