"""blkcache demo"""

import click

from . import options, output, render


@click.command("demo", context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@click.option("--size", type=options.SIZE, default="256M", show_default=True,
              help="Size of the scratch volume.")
def command(size):
    """Show the migration hazard and its remedy on scratch loop devices.

    Needs root.  Attaches two loop devices to one sparse file in /var/tmp
    (two hosts on shared storage), caches a page on the "destination", writes
    new data on the "source", shows the stale read, drops and verifies the
    destination's cache, shows the fresh read, then detaches everything.
    """
    from .. import demo, exitcodes
    from ..errors import BlkcacheError, UsageError

    try:
        for step, detail in demo.run(size):
            click.echo(f"{step:>8}: {detail}")
    except (OSError, BlkcacheError) as exc:
        output.error(render.describe(exc))
        return exitcodes.for_error(exc) if isinstance(exc, UsageError) else exitcodes.FAILURE
    return exitcodes.OK
