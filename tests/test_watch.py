"""blkcache watch: a line per change, stop conditions, signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from blkcache import api
from blkcache.watch import watch

import cliproc
import kernel
from units import PAGE, MiB

LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} +(\S+) +(\S+) +(\S+) +(\S+) (\S+)$")


def default_sigint():
    """In the child: SIGINT as Ctrl-C delivers it, even when this run inherited
    it ignored (a background job of a non-interactive shell); else Python leaves
    it ignored and the child never sees the signal the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_watch(*args):
    return cliproc.start("watch", *args, preexec_fn=default_sigint)


@pytest.fixture
def watchers():
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_count_prints_only_changes(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def timed():
        start = time.monotonic()
        out = cliproc.completed("watch", "--count", "3", "--interval", "0.1", loopdev)
        return out, time.monotonic() - start
    # A run during which the kernel kept the 4 pages (else read them again).
    out, took = kernel.steady(loopdev.fd, 4, lambda: kernel.fill(loopdev.fd, 0, 4 * PAGE),
                              timed)
    assert (out.returncode, out.stderr) == (0, "")
    assert took >= 0.2                            # it did sample three times
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIME", "RES", "PAGES", "DIRTY", "WRITEBACK", "DEVICE"]
    assert len(lines) == 2                        # nothing changed: one sample line
    assert LINE.match(lines[1]).groups() == ("16K", "4", "0", "0", loopdev)
    before, out, after = kernel.around(
        loopdev.fd, lambda: cliproc.completed("watch", "--count", "1", "-b", "-n", loopdev))
    assert (out.returncode, out.stderr) == (0, "")
    res, pages, dirty, writeback, device = LINE.match(out.stdout.strip()).groups()
    kernel.between(before, int(pages), after)
    assert (res, dirty, writeback, device) == (str(int(pages) * PAGE), "0", "0", loopdev)


def test_api_generator_yields_changes(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def run():
        os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        reads = iter([PAGE, 2 * PAGE, None, None, 3 * PAGE])
        seen = []

        def sleep(_):
            # Between samples: change the cache (or not) deterministically.
            step = next(reads)
            if step:
                kernel.read_buffered(loopdev.fd, 16 * step, PAGE)
            seen.append(kernel.cachestat(loopdev.fd)["nr_cache"])

        with api.Target(loopdev) as target:
            samples = list(watch(target, interval=0.01, count=6, sleep=sleep))
        seen.append(kernel.cachestat(loopdev.fd)["nr_cache"])
        return samples, seen
    # A run during which reclaim took none of the pages read (else again).
    for _ in range(5):
        samples, seen = run()
        if seen == [1, 2, 2, 2, 3, 3]:
            break
    assert seen == [1, 2, 2, 2, 3, 3], "reclaim struck in every run"
    assert [s.state.cached for s in samples] == [0, 1, 2, 3]
    assert [s.sample for s in samples] == [1, 2, 3, 6]


def test_until_empty_follows_a_drop(loopdev, watchers):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(loopdev.fd, 0, 8 * PAGE)
    before = kernel.count(loopdev.fd, stress=1)
    proc = start_watch("--json", "--until-empty", "--timeout", "30", "--interval", "0.05",
                       loopdev)
    watchers.append(proc)
    first = json.loads(proc.stdout.readline())
    kernel.between(before, first["cached"], kernel.cachestat(loopdev.fd)["nr_cache"])
    assert first["cached"] > 0 and first["dirty"] == 0 and first["sample"] == 1
    kernel.read_buffered(loopdev.fd, MiB, 8 * PAGE)
    before = kernel.cachestat(loopdev.fd)["nr_cache"]
    second = json.loads(proc.stdout.readline())
    # A change: the 8 pages read (reclaim only takes pages: at most that many).
    assert first["cached"] < second["cached"] <= first["cached"] + 8
    assert second["cached"] >= kernel.cachestat(loopdev.fd)["nr_cache"]
    api.drop(loopdev)
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read() == ""
    assert rest[-1]["cached"] == 0
    counts = [first["cached"], second["cached"]] + [r["cached"] for r in rest]
    assert all(a != b for a, b in zip(counts, counts[1:]))


def test_until_empty_times_out_with_exit_1(loopdev):
    kernel.fill(loopdev.fd, 0, 64 * PAGE)
    start = time.monotonic()
    out = cliproc.completed("watch", "--until-empty", "--timeout", "0.5", "--interval", "0.1",
                       "-n", loopdev)
    assert (out.returncode, out.stderr) == (1, "")
    assert 0.3 < time.monotonic() - start < 10
    # One line, or more if reclaim took a page meanwhile; never an empty device.
    lines = out.stdout.splitlines()
    assert lines and all(int(line.split()[2]) > 0 for line in lines), lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(loopdev, watchers, sig):
    proc = start_watch("--interval", "0.05", loopdev)
    watchers.append(proc)
    assert proc.stdout.readline().split()[0] == "TIME"
    assert LINE.match(proc.stdout.readline().rstrip("\n"))
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr.read() == ""


def test_bad_device_and_options(tmp_path):
    out = cliproc.completed("watch", str(tmp_path / "missing"))
    assert (out.returncode, out.stdout) == (2, "")
    assert "missing" in cliproc.one_error_line(out.stderr)
    out = cliproc.completed("watch", "--interval", "0", "/dev/null")
    assert (out.returncode, out.stdout) == (2, "")
    cliproc.one_error_line(out.stderr)


def test_unknown_state_stops_at_once(loopdev):
    """Not owner, no write access, no CAP_FOWNER: one unknown sample, then stop."""
    code = f"""
import os
from blkcache import api, exitcodes
from blkcache.watch import watch
t = api.Target({str(loopdev)!r})
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
samples = list(watch(t, interval=0.01, count=50))
print(len(samples), samples[0].state.exact, samples[0].state.cached,
      exitcodes.for_watch(samples[-1]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "False", "None", "3"]
