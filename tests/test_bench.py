"""The benchmark's smoke mode (bench/bench.py --quick) keeps working.

Runs the bench as a subprocess on its own scratch loop devices, checks the
JSON it writes (every row present, measured or skipped for a missing peer
only), and that it detaches every loop device it attached, also when
interrupted.  The goals themselves are not asserted: timings on a shared CI
machine are noise at this scale; the full run is not a test.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "bench", "bench.py")

EXPECTED = ["startup", "startup-m", "status-16G", "status-16G-len1G", "status-mincore-16G",
            "status-16G-fincore", "flat-16G/1G", "drop-256M", "helper-256M",
            "api-drop-256M", "api-status-256M", "api-status-empty",
            "coherence-64M", "coherence-64M-10pct", "holders-100"] + [
            f"scale-{op}-{size}" for size in ("4M", "16M", "64M")
            for op in ("status", "coherence", "drop")] + [
            f"scale-holders-{count}" for count in (10, 50, 100)]
# A row may be skipped only because a peer (or the C compiler) is missing.
SKIP_REASONS = ("vmtouch not installed", "fincore", "helper", "blockdev not installed",
                "fuser not installed", "dd not installed", "no C compiler", "gcc failed")
# Rows of the scaling table: blkcache alone, no peer.
SCALE = {name for name in EXPECTED if name.startswith("scale-")}
# Rows that need nothing but blkcache, the interpreter and losetup.
ALWAYS = {"startup", "startup-m"}

pytestmark = pytest.mark.skipif(not os.path.exists(BENCH), reason="bench/ not in this tree")


def bench_loops(workdir):
    """Loop devices whose backing file lies in the bench's work directory."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if workdir in line]


def bench_loops_gone(workdir, timeout=10):
    """The bench's loop devices, after waiting for deferred detaches: losetup -d
    on a device some process still holds (a child the interrupt orphaned) only
    marks it to go when that last opener closes it."""
    deadline = time.monotonic() + timeout
    while (left := bench_loops(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_quick_run_writes_every_row(loop_available, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == EXPECTED
    for name, row in rows.items():
        if row["skipped"]:
            assert name not in ALWAYS, row
            assert any(reason in row["skipped"] for reason in SKIP_REASONS), row
            continue
        assert row["blkcache"]["wall_median"] > 0, row
        if name in SCALE:
            assert row["peer"] is None and row["scale"]["amount"] > 0, row
            continue
        assert row["peer"]["wall_median"] > 0, row
        assert row["wall_ratio"] > 0, row
    # Child processes' peak RSS is measured (via the C launcher, when gcc is there).
    if "launcher" in report["notes"]["rss"]:
        assert 1024 < rows["startup"]["blkcache"]["rss_median_kib"] < 200 * 1024
    # The tables are printed, and nothing is left attached or running.
    assert "ROW" in proc.stdout and "startup" in proc.stdout
    assert "SCALING" in proc.stdout and "verify --coherence" in proc.stdout
    assert bench_loops(report["notes"]["workdir"]) == []
    assert not os.path.exists(report["notes"]["workdir"])


def default_sigint():
    """In the child: SIGINT as Ctrl-C delivers it, even when this run inherited
    it ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_detaches_everything(loop_available, tmp_path):
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--json",
                             str(tmp_path / "bench.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    workdir = None
    try:
        for line in proc.stderr:
            if line.startswith("bench: workdir "):
                workdir = line.split()[-1]
            if line.startswith("bench: status:"):
                break       # the loop devices are attached now
        assert workdir and bench_loops(workdir), "bench attached no loop device"
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in rest
    assert bench_loops_gone(workdir) == []
    assert not (tmp_path / "bench.json").exists()
