"""blkcache doctor"""

import click

from . import options, output, render


@click.command("doctor", context_settings=options.CONTEXT)
@options.devices(required=False)
@click.option("--helper-path", is_flag=True,
              help="Print only the path of the package's own copy of the setcap "
                   "helper blkcache-flush (what install-helper installs).")
@options.apply(options.JSON)
def command(devices, helper_path, as_json):
    """Check what blkcache can do here, as this user, and how to fix it.

    Reports the kernel, whether cachestat(2) exists, this process's effective
    capabilities, the helper blkcache-flush and its file capability (which
    copy is used, and why not the others), the method 'drop' will use, for
    each DEVICE whether status and verify will get counts from the kernel as
    this user or only "unknown", and the failed write-backs on record (see
    'blkcache failures').  Each problem comes with a fix.  Exit status 0 once
    the report is printed (problems or not), 2 on bad usage, 5 when
    --helper-path finds no helper.
    """
    from .. import exitcodes

    if helper_path:
        from .. import privilege

        path = privilege.helper_path()
        if not privilege.helper_status(path).installed:
            output.error(f"{render.display(path)}: {privilege.HELPER_NAME} is not installed")
            return exitcodes.FAILURE
        click.echo(path)
        return exitcodes.OK
    from ..doctor import doctor

    report = doctor(devices)
    if as_json:
        output.emit_json(report.to_dict())
    else:
        click.echo(render.doctor(report))
    return exitcodes.OK
