"""verify --coherence: stale pages found exactly, nothing added, nothing written."""

import io
import os
import re
import subprocess
import sys

import pytest

from blkcache import api, coherence
from blkcache.cli.output import Progress

import cliproc
import kernel
from units import PAGE, MiB

# Pages the destination reads (and so caches), and pages the source rewrites.
DEST_READS = [(0, 16), (1024, 16)]          # (first page, count)
SOURCE_WRITES = [(3, 1), (5, 2), (1030, 1), (2000, 1)]   # 2000 is not cached there
EXPECTED_STALE = ((3 * PAGE, PAGE), (5 * PAGE, 2 * PAGE), (1030 * PAGE, PAGE))


def pages_of(ranges):
    return {off // PAGE + i for off, length in ranges for i in range(length // PAGE)}


def assert_stale(reported, expected, dest):
    """The stale pages reported are pages the source rewrote, and every one of
    those still cached after the scan (so cached during it) is reported.

    Exact when nothing was reclaimed; reclaim only makes the set smaller."""
    reported, expected = pages_of(reported), pages_of(expected)
    assert reported <= expected, sorted(reported - expected)
    still = {p for p in expected if kernel.cached_pages(dest, p * PAGE, PAGE)}
    assert still <= reported, sorted(still - reported)
    return reported


def fill_dest(dest_fd):
    """(Re)read the destination's pages until all DEST_READS are cached."""
    for first, count in DEST_READS:
        kernel.fill(dest_fd, first * PAGE, count * PAGE)


@pytest.fixture
def two_hosts(loops):
    """Two loop devices on one image: (source, destination, dest_fd, source_fd)."""
    image = loops.image(64 * MiB)
    with open(image, "r+b") as f:          # old contents: a recognisable pattern
        f.write(b"old!" * (8 * MiB // 4))
    source = loops.attach(image)
    dest = loops.attach(image)
    dest_fd = loops.hold(dest)
    os.posix_fadvise(dest_fd, 0, 0, os.POSIX_FADV_RANDOM)   # exactly the pages read
    fill_dest(dest_fd)
    src_fd = loops.hold(source, os.O_RDWR)
    for first, count in SOURCE_WRITES:
        os.pwrite(src_fd, b"NEW!" * (count * PAGE // 4), first * PAGE)
    os.fsync(src_fd)
    return source, dest, dest_fd, src_fd


def test_two_hosts_stale_pages_found_exactly(two_hosts):
    source, dest, dest_fd, _ = two_hosts
    resident = sum(count for _, count in DEST_READS)
    # The hazard is real: buffered reads on the destination return old bytes.
    assert kernel.read_buffered(dest_fd, 3 * PAGE, 4)[:4] == b"old!"
    assert kernel.read_direct(dest, 3 * PAGE, PAGE)[:4] == b"NEW!"

    before, report, after = kernel.around(dest_fd, lambda: coherence.coherence(dest), stress=1)
    assert before == resident
    assert report.verdict == "stale"
    stale = assert_stale(report.stale_ranges, EXPECTED_STALE, dest)
    assert report.stale == len(stale) > 0
    kernel.between(before, report.resident, after)
    assert report.dirty == 0
    assert report.compared + report.vanished == report.resident
    # The scan added no page (reclaim only takes them; a drop would take all).
    assert before * kernel.KEPT <= after <= before
    assert kernel.cached_pages(dest, 2000 * PAGE, PAGE) == 0

    api.drop(dest)
    after = coherence.coherence(dest)
    assert (after.verdict, after.stale, after.resident) == ("coherent", 0, 0)
    # Cached again, now with the new bytes: coherent, and still not stale.
    fill_dest(dest_fd)
    before, again, after = kernel.around(dest_fd, lambda: coherence.coherence(dest))
    assert (again.verdict, again.stale) == ("coherent", 0)
    kernel.between(before, again.compared, after)
    assert after <= before == resident


def test_two_hosts_cli(two_hosts):
    _, dest, dest_fd, _ = two_hosts
    before, proc, after = kernel.around(
        dest_fd, lambda: cliproc.completed("verify", "--coherence", dest), stress=1)
    assert (proc.returncode, proc.stderr) == (1, "")
    head, *rest = proc.stdout.splitlines()
    match = re.fullmatch(rf"{re.escape(dest)}: stale: (\d+) of (\d+) compared pages differ "
                         r"from the device \((\d+) resident, 0 dirty and (\d+) evicted not "
                         r"compared\)", head)
    assert match, head
    stale, compared, resident, evicted = map(int, match.groups())
    kernel.between(before, resident, after)
    assert compared + evicted == resident
    ranges = []
    for line in rest:
        match = re.fullmatch(r"  stale offset (\d+) length (\d+) \((\d+) pages, (\d+)K\)",
                             line)
        assert match, line
        offset, length, pages, kib = map(int, match.groups())
        assert length == pages * PAGE == kib * 1024
        ranges.append((offset, length))
    assert stale == len(assert_stale(ranges, EXPECTED_STALE, dest)) > 0
    if before == after == 32:       # reclaim took nothing: the exact text
        assert proc.stdout.splitlines() == [
            f"{dest}: stale: 4 of 32 compared pages differ from the device "
            "(32 resident, 0 dirty and 0 evicted not compared)",
            f"  stale offset {3 * PAGE} length {PAGE} (1 pages, 4K)",
            f"  stale offset {5 * PAGE} length {2 * PAGE} (2 pages, 8K)",
            f"  stale offset {1030 * PAGE} length {PAGE} (1 pages, 4K)",
        ]
    # --quiet: the verdict in the exit status alone (1 is also a crash's code).
    quiet = cliproc.completed("verify", "--coherence", "--quiet", dest)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, "", "")
    drop = cliproc.completed("drop", "--quiet", dest)
    assert (drop.returncode, drop.stdout, drop.stderr) == (0, "", "")
    assert kernel.cachestat(dest_fd)["nr_cache"] == 0
    proc = cliproc.completed("verify", "--coherence", dest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"{dest}: coherent: 0 cached pages match the device "
                           "(0 resident, 0 dirty and 0 evicted not compared)\n")


def test_json_lists_ranges(two_hosts):
    import json

    _, dest, dest_fd, _ = two_hosts
    before, proc, after = kernel.around(
        dest_fd, lambda: cliproc.completed("verify", "--coherence", "--json", dest), stress=1)
    assert (proc.returncode, proc.stderr) == (1, "")
    (record,) = json.loads(proc.stdout)["devices"]
    assert record["verdict"] == "stale"
    stale = assert_stale(record["stale_ranges"], EXPECTED_STALE, dest)
    assert record["stale"] == len(stale) > 0
    kernel.between(before, record["resident"], after)
    assert record["logical_block_size"] == 512


def test_dirty_pages_are_reported_apart_and_never_written(loops):
    image = loops.image(16 * MiB)
    dev = loops.attach(image)
    wfd = loops.hold(dev, os.O_RDWR)
    os.posix_fadvise(wfd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(wfd, 0, 8 * PAGE)
    os.pwrite(wfd, b"D" * PAGE, 10 * PAGE)            # dirty, not synced
    assert kernel.cachestat(wfd)["nr_dirty"] == 1, "the test needs a dirty page"
    before, report, after = kernel.around(wfd, lambda: coherence.coherence(dev))
    assert report.verdict == "dirty"
    assert report.dirty_ranges == ((10 * PAGE, PAGE),)
    assert (report.stale, report.dirty) == (0, 1)
    kernel.between(before - 1, report.compared, after - 1)      # all but the dirty one
    after = kernel.cachestat(wfd)
    assert after["nr_dirty"] == 1 and after["nr_cache"] <= before
    # Nothing reached the backing file: a direct read would have flushed it.
    assert kernel.read_direct(image, 10 * PAGE, PAGE) == bytes(PAGE)
    proc = cliproc.completed("verify", "--coherence", dev)
    assert (proc.returncode, proc.stderr) == (4, "")
    assert f"  dirty offset {10 * PAGE} length {PAGE} (1 pages, 4K)" in proc.stdout
    assert kernel.cachestat(wfd)["nr_dirty"] == 1


def test_evicted_pages_are_not_compared_and_not_read_in(loopdev):
    """A page mapped resident but gone by read time: "not compared", not re-read."""
    kernel.read_buffered(loopdev.fd, 0, 0)   # nothing cached
    with api.Target(loopdev) as target:
        scan = coherence._Scan(target, 512)
        try:
            scan.chunk(4 * MiB, 16 * PAGE)
        finally:
            scan.close()
    assert scan.vanished.pages == 16 and scan.vanished.ranges == [(4 * MiB, 16 * PAGE)]
    assert scan.compared == 0 and scan.stale.pages == 0
    assert kernel.cachestat(loopdev.fd)["nr_cache"] == 0


def test_resident_runs_match_the_kernel_window_by_window(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    wanted = [(0, 3), (255, 3), (700, 1), (4095, 2), (16383, 1)]

    def refill():
        for first, count in wanted:
            kernel.fill(loopdev.fd, first * PAGE, count * PAGE)

    def runs_of():
        with api.Target(loopdev) as target:
            return list(coherence.resident_runs(target, 0, target.size, window=MiB))
    # A run during which the kernel kept every page read (else again).
    windows = kernel.steady(loopdev.fd, sum(c for _, c in wanted), refill, runs_of)
    assert len(windows) == 64 and all(w_len == MiB for _, w_len, _ in windows)
    runs = [run for _, _, rs in windows for run in rs]
    # Page 255 and 256 straddle a window boundary: two runs there.
    assert runs == [(0, 3 * PAGE), (255 * PAGE, PAGE), (256 * PAGE, 2 * PAGE),
                    (700 * PAGE, PAGE), (4095 * PAGE, PAGE), (4096 * PAGE, PAGE),
                    (16383 * PAGE, PAGE)]


def test_unprivileged_reader_gets_unknown(loopdev):
    """Not owner, no write access, no CAP_FOWNER: cachestat EPERM, exit 3 semantics."""
    kernel.read_buffered(loopdev.fd, 0, MiB)
    code = f"""
import os, sys
from blkcache import api, coherence
t = api.Target({str(loopdev)!r})
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
r = coherence.check(t)
print(r.verdict, r.resident)
try:
    list(coherence.resident_runs(t, 0, t.size))
except PermissionError as exc:
    print("runs", exc.errno)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["unknown None", "runs 1"]


def test_progress_only_on_a_tty_and_after_the_delay():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    quick = Progress("comparing", file=tty, delay=60)
    quick(50, 100)
    quick.close()
    assert tty.getvalue() == ""
    slow = Progress("comparing", file=tty, delay=0)
    slow(50, 100)
    slow(100, 100)
    slow.close()
    assert "comparing" in tty.getvalue()
    piped = io.StringIO()
    never = Progress("comparing", file=piped, delay=0)
    never(100, 100)
    never.close()
    assert piped.getvalue() == ""
    off = Progress("comparing", enabled=False, file=Tty(), delay=0)
    off(100, 100)
    assert off.bar is None


def test_scan_adds_no_page_after_real_readahead(loops):
    """Readahead leaves PG_readahead marks; reading those pages must not fire more."""
    image = loops.image(64 * MiB)
    source, dest = loops.attach(image), loops.attach(image)
    dest_fd = loops.hold(dest)
    for off in (0, 8 * MiB, 20 * MiB):          # like QEMU probing: normal readahead
        os.pread(dest_fd, 64 * 1024, off)
    resident = [p for p in range(64 * MiB // PAGE)
                if kernel.cached_pages(dest, p * PAGE, PAGE)]
    assert len(resident) > 48
    # The source rewrites every other resident page, and one page not cached here.
    targets = resident[::2]
    src_fd = loops.hold(source, os.O_RDWR)
    for page in targets + [40 * MiB // PAGE]:
        os.pwrite(src_fd, b"new." * (PAGE // 4), page * PAGE)
    os.fsync(src_fd)
    before, report, after = kernel.around(dest_fd, lambda: coherence.coherence(dest))
    assert before <= len(resident)
    # No page added: the scan's reads fired no readahead.
    assert after <= before
    stale = assert_stale(report.stale_ranges, [(p * PAGE, PAGE) for p in targets], dest)
    assert report.stale == len(stale) > 0
    assert all(length == PAGE for _, length in report.stale_ranges)
    kernel.between(before, report.compared, after)
