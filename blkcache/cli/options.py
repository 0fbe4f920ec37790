"""Options shared by several commands, applied by a small decorator loop:

    @options.apply(options.RANGE)
"""

import click

from .. import exitcodes
from ..constants import INTERFACES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: The "Exit status" epilog of --help, from the one table in blkcache.exitcodes.
EXIT_HELP = exitcodes.help_text()


class SizeType(click.ParamType):
    """A byte size with an optional K/M/G/T... suffix (see blkcache.sizes)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from ..errors import UsageError
        from ..sizes import parse_size

        try:
            return parse_size(value, param.name if param else "size")
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()

RANGE = (
    click.option("--offset", "-o", type=SIZE, default=0, show_default=True,
                 help="Start of the range (bytes; K, M, G, T suffixes; rounded down "
                      "to a page)."),
    click.option("--length", "-l", type=SIZE, default=None,
                 help="Length of the range (default: to the end; rounded up to a page)."),
    click.option("--interface", type=click.Choice(INTERFACES), default="auto",
                 show_default=True,
                 help="Kernel interface for residency: cachestat(2), falling back to "
                      "mincore(2) only where cachestat is missing."),
)
SIZES = (
    click.option("-b", "--bytes", "in_bytes", is_flag=True, help="Print sizes in bytes."),
    click.option("-n", "--noheadings", is_flag=True, help="Do not print a header line."),
)
QUIET = (click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),)
RECURSIVE = (
    click.option("-r", "--recursive", is_flag=True,
                 help="Also each device's partitions, the devices below it (a partition's "
                      "disk, sysfs slaves) and the devices above it (sysfs holders), each "
                      "with its relation.  Without -r, one line on standard error names "
                      "the related devices not checked."),
)
JSON = (click.option("-J", "--json", "as_json", is_flag=True, help="Print JSON."),)


def apply(*groups):
    """Apply groups of options (tuples of click decorators), in order."""
    decorators = [option for group in groups for option in group]

    def decorate(func):
        for option in reversed(decorators):
            func = option(func)
        return func
    return decorate


def devices(required=True):
    """The DEVICE... argument."""
    return click.argument("devices", nargs=-1, required=required,
                          metavar="DEVICE..." if required else "[DEVICE]...")
