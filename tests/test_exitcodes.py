"""One table of exit codes (blkcache.exitcodes.TABLE): --help prints it, and
the man page's EXIT STATUS and the README say the same.  Pure: any user."""

import os
import re

from click.testing import CliRunner

from blkcache import exitcodes
from blkcache.cli import cli

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
