"""blkcache hook"""

import click

from . import options

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


@click.command("hook", context_settings=options.CONTEXT, epilog=HOOK_HELP)
@click.argument("kind", type=click.Choice(["libvirt"]))
@click.option("--path", "show_path", is_flag=True,
              help="Print where the script is installed instead of its text.")
def command(kind, show_path):
    """Print a ready hook script (KIND: libvirt) to install by hand."""
    from .. import exitcodes, hooks

    path = hooks.script_path(kind)
    if show_path:
        click.echo(path)
    else:
        with open(path, encoding="utf-8") as f:
            click.echo(f.read(), nl=False)
    return exitcodes.OK
