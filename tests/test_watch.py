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



def start_watch(*args):
    return cliproc.start("watch", *args)


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
    kernel.read_buffered(loopdev.fd, 0, 4 * PAGE)
    start = time.monotonic()
    out = cliproc.completed("watch", "--count", "3", "--interval", "0.1", loopdev)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start >= 0.2        # it did sample three times
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIME", "RES", "PAGES", "DIRTY", "WRITEBACK", "DEVICE"]
    assert len(lines) == 2                        # nothing changed: one sample line
    assert LINE.match(lines[1]).groups() == ("16K", "4", "0", "0", loopdev)
    out = cliproc.completed("watch", "--count", "1", "-b", "-n", loopdev)
    assert LINE.match(out.stdout.strip()).groups() == (str(4 * PAGE), "4", "0", "0",
                                                       loopdev)


def test_api_generator_yields_changes(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    reads = iter([PAGE, 2 * PAGE, None, None, 3 * PAGE])

    def sleep(_):
        # Between samples: change the cache (or not) deterministically.
        step = next(reads)
        if step:
            kernel.read_buffered(loopdev.fd, 16 * step, PAGE)

    with api.Target(loopdev) as target:
        samples = list(watch(target, interval=0.01, count=6, sleep=sleep))
    assert [s.state.cached for s in samples] == [0, 1, 2, 3]
    assert [s.sample for s in samples] == [1, 2, 3, 6]


def test_until_empty_follows_a_drop(loopdev, watchers):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, 8 * PAGE)
    proc = start_watch("--json", "--until-empty", "--timeout", "30", "--interval", "0.05",
                       loopdev)
    watchers.append(proc)
    first = json.loads(proc.stdout.readline())
    assert first["cached"] == 8 and first["dirty"] == 0 and first["sample"] == 1
    kernel.read_buffered(loopdev.fd, MiB, 8 * PAGE)
    second = json.loads(proc.stdout.readline())
    assert second["cached"] == 16
    api.drop(loopdev)
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=30) == 0
    assert rest[-1]["cached"] == 0
    counts = [first["cached"], second["cached"]] + [r["cached"] for r in rest]
    assert all(a != b for a, b in zip(counts, counts[1:]))


def test_until_empty_times_out_with_exit_1(loopdev):
    kernel.read_buffered(loopdev.fd, 0, 8 * PAGE)
    start = time.monotonic()
    out = cliproc.completed("watch", "--until-empty", "--timeout", "0.5", "--interval", "0.1",
                       "-n", loopdev)
    assert out.returncode == 1
    assert 0.3 < time.monotonic() - start < 10
    assert len(out.stdout.splitlines()) == 1


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
    assert out.returncode == 2
    assert out.stderr.startswith("blkcache: ") and "missing" in out.stderr
    out = cliproc.completed("watch", "--interval", "0", "/dev/null")
    assert out.returncode == 2 and out.stderr.startswith("blkcache: ")


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
