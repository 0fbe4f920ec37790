"""The command line: exit codes and exact output, on real loop devices."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from blkcache import __version__
from blkcache.cli import cli

import cliproc
import kernel
from units import PAGE, MiB


def run(*args):
    """blkcache via CliRunner: (exit code, stdout, stderr).

    CliRunner turns any exception into exit 1, which is also "pages remain":
    a crash must not pass for a verdict.
    """
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="blkcache")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"blkcache {' '.join(map(str, args))} crashed: "
                             f"{result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def blkcache(*args, timeout=60):
    """blkcache as a real process (python -m blkcache); never a traceback."""
    return cliproc.run(*map(str, args), timeout=timeout)


def no_readahead(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out == f"blkcache, version {__version__}\n"


def test_help_lists_commands_and_exit_codes():
    code, out, _ = run("--help")
    assert code == 0
    for word in ("status", "drop", "verify", "demo", "Exit status", "--expect-clean"[2:8]):
        assert word in out
    code, out, _ = run("drop", "-h")
    assert code == 0 and "--expect-clean" in out and "--method" in out


def test_status_table_exact(loopdev):
    no_readahead(loopdev.fd)
    blkcache_drop = run("drop", "-q", loopdev)
    assert blkcache_drop[0] == 0
    full = kernel.fill(loopdev.fd, 0, 4 * MiB)
    code, out, err = run("status", loopdev)
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header == "RES PAGES SIZE DIRTY WRITEBACK DEVICE"
    res, pages = row.split()[:2]
    assert row == f"{res:>3} {int(pages):5d}  64M     0         0 {loopdev}"
    if int(pages) == full:       # unless reclaim struck since the read: 4M exactly
        assert res == "4M"
    before, (code, out, _), after = kernel.around(
        loopdev.fd, lambda: run("status", "-b", "-n", loopdev))
    pages = int(out.split()[1])
    kernel.between(before, pages, after)
    assert out == f"{pages * PAGE} {pages} {64 * MiB} 0 0 {loopdev}\n"


def test_status_json_and_several_devices(loops):
    a, b = loops.attach(size=16 * MiB), loops.attach(size=32 * MiB)
    fa, fb = loops.hold(a), loops.hold(b)
    no_readahead(fa)
    no_readahead(fb)
    kernel.fill(fa, 0, MiB)
    kernel.fill(fb, 0, 2 * MiB)
    before_a, (before_b, (code, out, err), after_b), after_a = kernel.around(
        fa, lambda: kernel.around(fb, lambda: run("status", "-J", a, b)))
    assert code == 0 and err == ""
    rows = json.loads(out)["devices"]
    assert [r["path"] for r in rows] == [a, b]
    kernel.between(before_a, rows[0]["cached"], after_a)
    kernel.between(before_b, rows[1]["cached"], after_b)
    assert after_a > 0 and after_b > 0
    assert [r["cached_bytes"] for r in rows] == [r["cached"] * PAGE for r in rows]
    assert [r["size"] for r in rows] == [16 * MiB, 32 * MiB]
    assert all(r["exact"] and r["interface"] == "cachestat" for r in rows)


def test_status_range_with_suffixes(loopdev):
    no_readahead(loopdev.fd)
    kernel.fill(loopdev.fd, 8 * MiB, MiB)
    before, (code, out, _), after = kernel.around(
        loopdev.fd, lambda: run("status", "-b", "-n", "--offset", "8M", "--length", "1MiB",
                                loopdev), 8 * MiB, MiB)
    assert code == 0
    pages = int(out.split()[1])
    kernel.between(before, pages, after)
    assert out == f"{pages * PAGE} {pages} {MiB} 0 0 {loopdev}\n"


def test_status_mincore_shows_dash_for_dirty(loopdev):
    no_readahead(loopdev.fd)
    kernel.fill(loopdev.fd, 0, MiB)
    before, (code, out, _), after = kernel.around(
        loopdev.fd, lambda: run("status", "-n", "--interface", "mincore", loopdev))
    assert code == 0
    res, pages, *rest = out.split()
    kernel.between(before, int(pages), after)
    assert rest == ["64M", "-", "-", loopdev]


def test_drop_then_verify(loopdev):
    kernel.read_buffered(loopdev.fd, 0, 8 * MiB)
    before = kernel.count(loopdev.fd)
    code, out, err = run("drop", loopdev)
    assert (code, err) == (0, "")
    assert out.startswith(f"{loopdev}: ") and " -> 0 pages cached (" in out, out
    kernel.reported_before_drop(before, int(out.split()[1]))
    assert "with BLKFLSBUF, 1 attempt)" in out
    assert kernel.cached_pages(loopdev) == 0
    code, out, _ = run("verify", loopdev)
    assert code == 0
    assert out == f"{loopdev}: clean: 0 of {64 * MiB // PAGE} pages (0B) cached\n"


def test_verify_resident_exits_1(loopdev):
    no_readahead(loopdev.fd)
    kernel.fill(loopdev.fd, 0, MiB)
    before, (code, out, _), after = kernel.around(loopdev.fd, lambda: run("verify", loopdev))
    assert code == 1
    pages = int(out.split()[2])
    kernel.between(before, pages, after)
    assert after > 0, "the test needs cached pages to mean anything"
    assert out.startswith(f"{loopdev}: resident: {pages} of {64 * MiB // PAGE} pages (")
    code, out, _ = run("verify", "-q", loopdev)
    assert (code, out) == (1, "")


def test_drop_json(loopdev):
    kernel.fill(loopdev.fd, 0, 2 * MiB)
    before = kernel.count(loopdev.fd)
    code, out, _ = run("drop", "--json", "--method", "fadvise", loopdev)
    assert code == 0
    (row,) = json.loads(out)["devices"]
    assert row["method"] == "fadvise" and row["complete"] is True
    assert row["after"]["cached"] == 0
    kernel.reported_before_drop(before, row["before"]["cached"])
    assert kernel.cached_pages(loopdev) == 0          # the kernel agrees


def test_expect_clean_refuses_with_exit_4(loops):
    dev = loops.attach()
    loops.hold(dev)
    wfd = loops.hold(dev, os.O_RDWR)
    os.pwrite(wfd, b"d" * MiB, 0)
    before, cached = kernel.cachestat(wfd), kernel.Reading(wfd)
    assert before["nr_dirty"] > 0
    code, out, err = run("drop", "--expect-clean", dev)
    assert code == 4 and out == ""
    assert err.startswith(f"blkcache: {dev}: ") and " dirty and " in err, err
    assert 0 < int(err.split()[2]) <= before["nr_dirty"]
    assert err.endswith("nothing was flushed or dropped\n") and err.count("\n") == 1
    kernel.not_dropped(wfd, cached)
    # Not written: a sync would leave none dirty.
    assert kernel.cachestat(wfd)["nr_dirty"] >= before["nr_dirty"] * kernel.KEPT


def test_two_hosts_scenario_end_to_end(loops):
    """DESIGN.md: stale pages on the destination until blkcache drop."""
    image = loops.image(64 * MiB)
    source, dest = loops.attach(image), loops.attach(image)
    held = loops.hold(dest)
    old = kernel.read_buffered(held, 0, 4 * MiB)          # destination probes
    assert old == bytes(4 * MiB)
    new = os.urandom(PAGE) * 16
    wfd = loops.hold(source, os.O_WRONLY)
    os.pwrite(wfd, new, 0)                                 # source writes ...
    os.fsync(wfd)                                          # ... and flushes
    assert kernel.read_direct(dest, 0, len(new)) == new    # the device has it
    assert os.pread(held, len(new), 0) != new              # the cache is stale
    code, _, err = blkcache("verify", dest)
    assert code == 1 and err == ""
    code, out, err = blkcache("drop", dest)
    assert code == 0 and err == "" and " -> 0 pages cached" in out
    assert os.pread(held, len(new), 0) == new              # fresh bytes now
    # ... and the source's cache was not touched.
    assert kernel.cached_pages(source) > 0


@pytest.mark.parametrize("args,code,message", [
    (["status"], 2, "blkcache: Missing argument 'DEVICE...' (try 'blkcache status --help')"),
    (["status", "--bogus", "x"], 2,
     "blkcache: No such option '--bogus' (try 'blkcache status --help')"),
    (["frobnicate"], 2, "blkcache: No such command 'frobnicate' (try 'blkcache --help')"),
    (["status", "/nonexistent/dev"], 2, "blkcache: /nonexistent/dev: No such file or directory"),
    (["status", ""], 2, "blkcache: empty path"),
    (["verify", "/"], 2, "blkcache: /: not a block device or regular file (a directory)"),
    (["drop", "/dev/null"], 2,
     "blkcache: /dev/null: not a block device or regular file (a character device)"),
    (["status", "--offset", "-1", "/dev/null"], 2,
     "blkcache: Invalid value for '--offset' / '-o': invalid offset: '-1' "
     "(try 'blkcache status --help')"),
    (["status", "--length", "12XB", "/dev/null"], 2,
     "blkcache: Invalid value for '--length' / '-l': invalid length: '12XB' "
     "(try 'blkcache status --help')"),
])
def test_bad_input_one_line(args, code, message):
    got, out, err = run(*args)
    assert (got, out, err) == (code, "", message + "\n")


def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, out, err = blkcache("status", fifo, timeout=20)
    assert code == 2 and out == ""
    assert err == f"blkcache: {fifo}: not a block device or regular file (a FIFO)\n"


def test_offset_beyond_end(loopdev):
    code, out, err = run("status", "--offset", "64M", loopdev)
    assert code == 2 and out == ""
    assert err == (f"blkcache: {loopdev}: offset {64 * MiB} is beyond the end of the device "
                   f"({64 * MiB} bytes)\n")


def test_bad_device_among_several_changes_nothing(loopdev):
    kernel.read_buffered(loopdev.fd, 0, 4 * MiB)
    before = kernel.count(loopdev.fd)
    code, out, err = run("drop", loopdev, "/nonexistent")
    assert (code, out) == (2, "")
    assert err == "blkcache: /nonexistent: No such file or directory\n"
    kernel.not_dropped(loopdev.fd, before)


def test_python_m_blkcache_and_console_script_agree(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "blkcache")
    assert os.access(script, os.X_OK), f"no console script {script} (pip install .)"
    missing = str(tmp_path / "missing")
    for args in (["--version"], ["status", missing], ["verify", "--help"]):
        module = blkcache(*args)
        proc = subprocess.run([script, *args], capture_output=True, text=True, timeout=60,
                              env=cliproc.env())
        assert "Traceback" not in proc.stderr, proc.stderr
        assert (proc.returncode, proc.stdout, proc.stderr) == module, args
    assert module[0] == 0
    code, out, _ = blkcache("--version")
    assert code == 0 and out == f"blkcache, version {__version__}\n"


def test_demo(loop_available):
    code, out, err = blkcache("demo", "--size", "32M", timeout=120)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [
        "image", "attach", "probe", "write", "status", "stale", "drop", "verify",
        "reread", "cleanup"]
    assert "OLD bytes" in out and "the destination is coherent" in out
    assert "verify: /dev/loop" in out and out.count("clean") >= 1
