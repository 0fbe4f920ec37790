"""blkcache install-helper"""

import click

from . import options, output, render


@click.command("install-helper", context_settings=options.CONTEXT)
@click.option("--prefix", default="/usr/local", show_default=True, metavar="PREFIX",
              help="Install as PREFIX/libexec/blkcache/blkcache-flush.")
@click.option("--uninstall", is_flag=True, help="Remove the helper installed there.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
def command(prefix, uninstall, dry_run):
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
    from .. import exitcodes
    from ..errors import BlkcacheError, UsageError
    from ..integrations import helper_install

    action = helper_install.uninstall if uninstall else helper_install.install
    try:
        outcome = action(prefix, dry_run=dry_run)
    except (OSError, BlkcacheError) as exc:
        output.error(render.describe(exc))
        return exitcodes.for_error(exc) if isinstance(exc, UsageError) else exitcodes.FAILURE
    for step in outcome.steps:
        click.echo(("would " if outcome.dry_run else "") + render.display(step))
    return exitcodes.OK
