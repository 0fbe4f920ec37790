"""blkcache.exitcodes: one table of exit codes (TABLE) that --help prints and
the man page's EXIT STATUS and the README repeat, and the mapping from
results and errors to codes.  Pure: any user."""

import errno
import os
import re

import pytest
from click.testing import CliRunner

from blkcache import exitcodes
from blkcache.cli import cli
from blkcache.errors import (
    CannotTellError,
    DirtyPagesError,
    InvalidRangeError,
    MethodUnavailableError,
    MissingNodeError,
    UnsupportedFileError,
    UsageError,
    WritebackFailedBefore,
)
from blkcache.results import CacheState, DropResult, StatusReport, Verification
from blkcache.stack import Related
from blkcache.watch import Sample

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(SOURCE, name), encoding="utf-8") as f:
        return f.read()


def _table_lines():
    return exitcodes.help_text().splitlines()[2:]


def man_exit_status():
    """{code: its first text (up to .br or the next entry)} of man/blkcache.8."""
    section = _read("man/blkcache.8").split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    entries = {}
    for code, body in re.findall(r"^\.TP\n\.B (\d+)\n(.*?)(?=^\.)", section, re.M | re.S):
        entries[int(code)] = " ".join(body.split()).replace("\\-", "-")
    return entries


def test_the_table_documents_every_code_once():
    codes = [code for code, _ in exitcodes.TABLE]
    assert codes == sorted(set(codes))
    assert set(codes) == {exitcodes.OK, exitcodes.RESIDENT, exitcodes.USAGE,
                          exitcodes.UNKNOWN, exitcodes.DIRTY, exitcodes.FAILURE,
                          exitcodes.ALL_FAILED, exitcodes.SOME_FAILED}


def test_help_prints_the_table():
    lines = _table_lines()
    joined = " ".join(" ".join(lines).split())
    for code, _ in exitcodes.TABLE:
        assert f"{code} {exitcodes.meaning(code)}" in joined
    for command in ([], ["status"], ["drop"], ["verify"], ["watch"], ["demo"]):
        result = CliRunner().invoke(cli, [*command, "--help"], prog_name="blkcache")
        assert result.exit_code == 0, result.output
        help_lines = [line.strip() for line in result.output.splitlines()]
        assert [line.strip() for line in lines] == \
            help_lines[help_lines.index("Exit status:") + 1:][:len(lines)], command


def test_the_man_page_says_what_the_table_says():
    assert man_exit_status() == {code: exitcodes.meaning(code) for code, _ in exitcodes.TABLE}


def test_the_readme_shows_the_table():
    assert "\n".join(_table_lines()) in _read("README.md")


# -- the mapping from results and errors to codes ----------------------------------

def _state(cached, exact=True):
    return CacheState("/d", "/d", "file", 4096, 4096, 0, 4096, 1, cached, 0, 0, 0, 0,
                      "cachestat", exact)


def test_for_result_of_each_kind():
    assert exitcodes.for_result(_state(3)) == exitcodes.OK          # status: it answered
    assert exitcodes.for_result(_state(None, exact=False)) == exitcodes.UNKNOWN
    assert exitcodes.for_result(StatusReport(_state(None, exact=False))) == exitcodes.UNKNOWN
    for verdict, code in (("clean", 0), ("resident", 1), ("unknown", 3)):
        assert exitcodes.for_result(Verification(verdict, _state(0))) == code
    for after, code in ((0, 0), (2, 1), (None, 3)):
        result = DropResult("/d", "/d", "fadvise", 1, _state(5), _state(after))
        assert exitcodes.for_result(result) == code


@pytest.mark.parametrize("exc,code", [
    (DirtyPagesError("dirty"), exitcodes.DIRTY),
    (CannotTellError("cannot tell"), exitcodes.UNKNOWN),
    (MethodUnavailableError("no"), exitcodes.FAILURE),
    (WritebackFailedBefore("before"), exitcodes.FAILURE),
    (MissingNodeError(Related(None, "ghost0", "240:7", "slave", "dm-0", 1)),
     exitcodes.FAILURE),
    (UsageError("too many"), exitcodes.USAGE),
    (InvalidRangeError("past the end"), exitcodes.USAGE),
    (UnsupportedFileError("a directory"), exitcodes.USAGE),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), exitcodes.USAGE),
    (OSError(errno.ELOOP, "loop"), exitcodes.USAGE),
    (PermissionError(errno.EACCES, "Permission denied"), exitcodes.FAILURE),
    (OSError(errno.EIO, "I/O error"), exitcodes.FAILURE),
    (OSError(errno.ENXIO, "No such device or address"), exitcodes.FAILURE),
])
def test_for_error(exc, code):
    assert exitcodes.for_error(exc) == code


@pytest.mark.parametrize("codes,combined", [
    ([], 0), ([5], 5), ([2], 2), ([0, 0], 0), ([0, 1], 1), ([1, 3], 3), ([3, 4, 0], 4),
    ([5, 5], exitcodes.ALL_FAILED), ([5, 0], exitcodes.SOME_FAILED),
    ([4, 5, 1], exitcodes.SOME_FAILED),
])
def test_combine(codes, combined):
    assert exitcodes.combine(codes) == combined


def test_output_errors():
    pipe, full = BrokenPipeError(errno.EPIPE, "pipe"), OSError(errno.ENOSPC, "full")
    assert [exitcodes.for_output_error(code, pipe) for code in (0, 1, 5)] == [0, 1, 5]
    assert [exitcodes.for_output_error(code, full) for code in (0, 1, 3, 5, 32, 64)] == \
        [5, 5, 5, 5, 32, 64]


def test_for_watch():
    def sample(cached, exact=True):
        return Sample(0.0, 0.0, 1, _state(cached, exact))
    assert exitcodes.for_watch(None) == exitcodes.OK
    assert exitcodes.for_watch(sample(None, exact=False)) == exitcodes.UNKNOWN
    assert exitcodes.for_watch(sample(2)) == exitcodes.OK
    assert exitcodes.for_watch(sample(2), until_empty=True) == exitcodes.RESIDENT
    assert exitcodes.for_watch(sample(0), until_empty=True) == exitcodes.OK
