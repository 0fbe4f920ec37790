"""blkcache failures"""

import click

from . import options, output, render


@click.command("failures", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@click.option("--clear", "clear", multiple=True, metavar="DEVICE",
              help="Forget the failed write-back on record for DEVICE (its current "
                   "instance); drops of it then go ahead.  Repeatable.")
@click.option("--prune", is_flag=True,
              help="Remove the stale records: their device instance is gone (detached, "
                   "re-attached), so they block nothing.")
@options.apply(options.JSON)
def command(clear, prune, as_json):
    """List the failed write-backs on record, or clear them without a drop.

    A failed write-back is recorded per device instance (major:minor and the
    kernel's disk sequence number); while a record is live, 'drop' of that
    device refuses (exit 5).  STATE: live (the instance exists: drops
    refuse), stale (it is gone: blocks nothing; see --prune), unknown (no
    disk sequence number to tell: it blocks every device with that number).
    """
    from .. import exitcodes, failures
    from ..errors import BlkcacheError

    try:
        if clear or prune:
            removed = failures.clear_paths(clear) + (failures.prune() if prune else [])
        else:
            found = failures.records()
    except (OSError, BlkcacheError) as exc:
        output.error(render.describe(exc))
        return exitcodes.for_error(exc)
    if clear or prune:
        if as_json:
            output.emit_json({"removed": [f.to_dict() for f in removed]})
        else:
            click.echo("\n".join(map(render.removed_line, removed)) or "no record removed")
    elif as_json:
        output.emit_json({"directory": failures.state_dir(),
                          "failures": [f.to_dict() for f in found]})
    elif found:
        click.echo(render.failures_table(found))
    else:
        click.echo("no failed write-back on record "
                   f"({render.display(failures.state_dir())})")
    return exitcodes.OK
