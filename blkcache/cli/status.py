"""blkcache status"""

import click

from . import options, output, render


@click.command("status", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@options.devices()
@options.apply(options.RANGE, options.SIZES)
@click.option("--holders", is_flag=True,
              help="Also list who holds each device open: processes (pid, command, fds, "
                   "mappings), mounts and stacked devices (sysfs holders).")
@click.option("--map", "show_map", is_flag=True,
              help="Also draw where the cached pages are: 64 columns, ' ' none, 'o' part, "
                   "'O' all cached (like vmtouch -v).")
@click.option("--prometheus", is_flag=True,
              help="Print Prometheus metrics (text exposition format) of the whole "
                   "devices instead of the table; needs prometheus_client "
                   "(pip install 'blkcache[prometheus]').")
@click.option("--textfile", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write the Prometheus metrics to PATH atomically (a temporary file in "
                   "its directory, renamed over it) for node_exporter's textfile "
                   "collector; PATH must end in .prom.  Implies --prometheus.")
@options.apply(options.RECURSIVE, options.JSON)
def command(devices, offset, length, interface, in_bytes, noheadings, holders, show_map,
            recursive, prometheus, textfile, as_json):
    """Show how much of each DEVICE is in the page cache.

    One row per device, like fincore(1): RES (bytes cached), PAGES (pages
    cached), SIZE (of the range), DIRTY and WRITEBACK (pages; '-' where
    mincore(2) answered, which does not tell).  '?' means the kernel will
    not tell this user (exit 3).  JSON sizes are always in bytes.

    Each partition and stacked device has a page cache of its own: see
    --recursive (a RELATION column then says how each row relates).  The
    cache lives only while someone holds the device open: see --holders.
    """
    if prometheus or textfile:
        return metrics(devices, interface, recursive, textfile, {
            "--offset": offset != 0, "--length": length is not None, "--bytes": in_bytes,
            "--noheadings": noheadings, "--holders": holders, "--map": show_map,
            "--json": as_json})
    from .. import api

    def action(target):
        with output.Progress(f"mapping {render.display(target.path)}",
                             enabled=show_map and not as_json) as progress:
            return api.status_report(target, offset, length, interface, holders, show_map,
                                     progress)

    reports = api.run(devices, action, recursive, output.report_error, offset=offset,
                      length=length)
    if as_json:
        output.emit_batch(reports, recursive)
        return reports.code
    done = [o for o in reports.outcomes if o.error is None]
    if done:
        relations = [o.relation for o in done] if recursive else None
        click.echo(render.table([o.result.state for o in done], in_bytes, noheadings,
                                relations))
        for line in render.status_extras(reports.results):
            click.echo(line)
    output.not_checked(reports)
    return reports.code


def metrics(devices, interface, recursive, textfile, others):
    """status --prometheus / --textfile: blkcache.integrations.prometheus,
    printed or written to ``textfile``; nothing is written on bad input."""
    from .. import exitcodes
    from ..errors import MissingDependencyError
    from ..integrations import prometheus

    given = [name for name, used in others.items() if used]
    if given:
        raise click.UsageError(f"--prometheus reports whole devices as metrics: "
                               f"{', '.join(given)} cannot go with it")
    if textfile is not None and not textfile.endswith(".prom"):
        raise click.UsageError(f"--textfile {render.display(textfile)}: node_exporter "
                               "reads only files ending in .prom")
    try:
        prometheus.require()
    except MissingDependencyError as exc:
        output.error(render.describe(exc))
        return exitcodes.for_error(exc)
    readings = prometheus.read_all(devices, interface, recursive, output.report_error)
    if not readings.results:
        return readings.code
    if textfile is None:
        click.echo(prometheus.exposition(readings.results), nl=False)
        return readings.code
    try:
        prometheus.write_textfile(textfile, readings.results)
    except OSError as exc:
        output.error(render.describe(exc))
        return exitcodes.FAILURE
    return readings.code
