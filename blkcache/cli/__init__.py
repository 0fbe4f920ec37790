"""The blkcache command: a renderer over the library (blkcache.api).

Each command is one module of this package (``cli/<name>.py``, a click
command named ``command``), registered in COMMANDS and imported only when it
runs or --help lists it.  A command parses its options, calls the library,
renders the result (cli/render.py, cli/output.py) and returns an exit code
from blkcache.exitcodes.  Only click is imported at start-up.
"""

import importlib
import sys

import click

from .._version import __version__
from . import options, output

#: Command name -> module of this package.  A new command: its module, one line here.
COMMANDS = {
    "demo": "demo",
    "doctor": "doctor",
    "drop": "drop",
    "failures": "failures",
    "hook": "hook",
    "install-helper": "install_helper",
    "status": "status",
    "verify": "verify",
    "watch": "watch",
}


class BlkcacheGroup(click.Group):
    """Loads commands on demand; turns every click error into one
    'blkcache: ...' line and exit 2; guards stdout (see GuardedStdout)."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{COMMANDS[name]}").command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        output.fill_standard_fds()
        guard = output.GuardedStdout.install()
        try:
            code = self._run(args, prog_name, complete_var, **extra)
        finally:
            lost = guard.remove() if guard is not None else None
        if lost is not None:
            from .. import exitcodes

            if not isinstance(lost, BrokenPipeError):
                output.error(f"cannot write output: {lost.strerror or lost}")
            code = exitcodes.for_output_error(code, lost)
        sys.exit(code)

    def _run(self, args, prog_name, complete_var, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name or "blkcache",
                                complete_var=complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx else ""
            output.error(f"{exc.format_message().rstrip('.')}{hint}")
            code = 2
        except click.ClickException as exc:
            output.error(exc.format_message())
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            output.error("interrupted")
            code = 130
        except BrokenPipeError:
            code = 0
        return code if isinstance(code, int) else 0


@click.group(cls=BlkcacheGroup, context_settings=options.CONTEXT, epilog=options.EXIT_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="blkcache",
                      message="%(prog)s, version %(version)s", help="Show the version and exit.")
def cli():
    """Drop and verify the page cache of block devices.

    Before a migrated guest reads its shared volume, the destination host's
    page cache must hold no stale page of it: `blkcache drop DEVICE` writes
    back dirty pages, drops the cache and verifies that it is empty.
    DEVICE is a block device or a regular file (an image on shared storage).
    """


def main(args=None, prog_name="blkcache"):
    cli.main(args=args, prog_name=prog_name)
