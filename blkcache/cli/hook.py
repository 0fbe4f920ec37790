"""blkcache hook"""

import click

from . import options, output, render

HOOK_HELP = """\b
Hooks shipped with blkcache:
  libvirt   /etc/libvirt/hooks/qemu.d/blkcache (libvirt >= 6.5), for
            migration destinations and every start: on 'migrate begin',
            'prepare begin', 'start begin' and 'started begin' it reads the
            domain XML on stdin and, for the block devices of its
            <devices><disk type='block'> sources (absolute paths only), their
            partitions and the devices below them, reports coherence
            (verify --coherence -r) then drops the cache (drop --expect-clean
            -r) in one process; dirty pages, a failed drop or pages left:
            exit 1 and libvirt aborts.  Every other event: exit 0.
            The hook runs this interpreter (python -I) and this blkcache
            package, by absolute path.
\b
Install:  blkcache hook libvirt --install    (then restart libvirtd)
Remove:   blkcache hook libvirt --uninstall"""


@click.command("hook", context_settings=options.CONTEXT, epilog=HOOK_HELP)
@click.argument("kind", type=click.Choice(["libvirt"]))
@click.option("--install", "action", flag_value="install",
              help="Write the hook as /etc/libvirt/hooks/qemu.d/blkcache (root, 0755, "
                   "atomically); /etc/libvirt/hooks/qemu is left untouched.")
@click.option("--uninstall", "action", flag_value="uninstall", help="Remove that file.")
@click.option("--path", "action", flag_value="path",
              help="Print where --install writes the hook.")
def command(kind, action):
    """Print, install or remove the libvirt hook (KIND: libvirt).

    Without an option, prints the script that --install writes.  Exit status
    0, or 5 when the hook cannot be written or removed.
    """
    from .. import exitcodes
    from ..integrations import libvirt

    try:
        if action == "install":
            path, notes = libvirt.install()
            click.echo(f"installed {render.display(path)}")
            for note in notes:
                click.echo(f"note: {render.display(note)}")
        elif action == "uninstall":
            path, removed = libvirt.uninstall()
            click.echo(f"removed {path}" if removed else f"{path}: not installed")
        elif action == "path":
            click.echo(libvirt.HOOK_PATH)
        else:
            click.echo(libvirt.hook_script(), nl=False)
    except libvirt.InstallError as exc:
        output.error(render.display(str(exc)))
        return exitcodes.FAILURE
    return exitcodes.OK
