"""verify --coherence at disk speed keeps its promises, also under page reclaim.

The scan reads the device in large O_DIRECT chunks, a thread ahead of the
comparison, and compares in C through a mapping of the cache.  Whatever the
reclaimer takes meanwhile, the scan must add no page to the cache, never
write, count dirty pages apart, and report a page evicted after the
residency map as evicted instead of reading it back in.  Counts are bounded
by the oracle's readings (tests/kernel.py), never compared with one exact
reading taken at another moment.
"""

import os

from blkcache import api, coherence

import kernel
from units import PAGE, MiB


def cached(fd, offset=0, length=0):
    return kernel.cachestat(fd, offset, length)["nr_cache"]


def test_no_page_added_where_readahead_would_add_pages(loops):
    """Pages cached after the scan <= before, on a device with readahead on.

    The control at the end shows that a plain buffered read of the same pages
    does add pages here (PG_readahead marks fire): the scan's restraint is
    what kept the count from growing.
    """
    image = loops.image(64 * MiB)
    dev = loops.attach(image)
    fd = loops.hold(dev)
    for off in (0, 8 * MiB, 20 * MiB, 40 * MiB):     # normal readahead, like a probe
        os.pread(fd, 64 * 1024, off)
    before = cached(fd)
    assert before > 64, "readahead cached too little to test with"
    report = coherence.coherence(dev)
    after = cached(fd)
    assert after <= before
    assert report.verdict == "coherent" and report.read_in == 0
    # Every resident page is accounted for, and the kernel saw at least as
    # many before the scan as the scan found.
    assert report.compared + report.vanished == report.resident <= before
    assert report.compared >= after
    # Control: reading the cached pages the ordinary way grows the cache.
    # Control: reading just the pages still cached, the ordinary way (page by
    # page), grows the cache: their PG_readahead marks fire.
    resident = [p for p in range(64 * MiB // PAGE) if cached(fd, p * PAGE, PAGE)]
    for page in resident:
        os.pread(fd, PAGE, page * PAGE)
    assert cached(fd) > len(resident)


def test_page_evicted_after_the_map_is_reported_not_read_back(loopdev):
    """Pages gone between the device read and the comparison: vanished, still gone."""
    fd = loopdev.fd
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fd, 0, 64 * PAGE)
    with api.Target(loopdev) as target:
        scan = coherence._Scan(target, 512)
        try:
            chunk = scan.read(0, 64 * PAGE, 0)
            os.posix_fadvise(fd, 16 * PAGE, 16 * PAGE, os.POSIX_FADV_DONTNEED)
            assert cached(fd, 16 * PAGE, 16 * PAGE) == 0
            scan.compare(chunk)
        finally:
            scan.close()
    assert cached(fd, 16 * PAGE, 16 * PAGE) == 0, "an evicted page was read back in"
    assert scan.read_in == 0
    # The 16 evicted pages are vanished; reclaim may have taken a few more.
    assert _covers(scan.vanished.ranges, 16 * PAGE, 32 * PAGE)
    assert scan.vanished.pages >= 16 and scan.compared + scan.vanished.pages == 64
    assert scan.stale.pages == 0 and scan.dirty.pages == 0


def _covers(ranges, start, end):
    return all(any(off <= p < off + ln for off, ln in ranges)
               for p in range(start, end, PAGE))


def test_dirty_pages_inside_a_large_chunk_apart_and_not_written(loops):
    """A dirty page in the middle of a fully cached 4 MiB chunk: counted dirty,
    its logical block not read with O_DIRECT (which would write it back)."""
    image = loops.image(16 * MiB)
    with open(image, "r+b") as f:
        f.write(b"old!" * (16 * MiB // 4))
    dev = loops.attach(image)
    wfd = loops.hold(dev, os.O_RDWR)
    kernel.read_buffered(wfd, 0, 8 * MiB)
    dirty_at = 2 * MiB + 5 * PAGE
    os.pwrite(wfd, b"D" * PAGE, dirty_at)                 # dirty, not synced
    assert kernel.cachestat(wfd)["nr_dirty"] == 1, "the test needs a dirty page"
    before = cached(wfd)
    report = coherence.coherence(dev)
    assert report.verdict == "dirty"
    assert report.dirty_ranges == ((dirty_at, PAGE),)
    assert (report.stale, report.dirty, report.read_in) == (0, 1, 0)
    assert report.compared + report.vanished + report.dirty == report.resident <= before
    assert cached(wfd) <= before
    # Still dirty, and nothing reached the backing file.
    assert kernel.cachestat(wfd)["nr_dirty"] == 1
    assert kernel.read_direct(image, dirty_at, PAGE) == b"old!" * (PAGE // 4)


def test_stale_pages_found_across_chunks_and_windows(loops):
    """The read-ahead pipeline keeps chunks in order: stale pages in several
    chunks and in two residency windows are all found, at their offsets."""
    image = loops.image(160 * MiB)
    source, dest = loops.attach(image), loops.attach(image)
    dest_fd = loops.hold(dest)
    os.posix_fadvise(dest_fd, 0, 0, os.POSIX_FADV_RANDOM)
    spans = [(0, 9 * MiB), (126 * MiB, 4 * MiB)]           # 3 chunks; across 128 MiB
    for off, length in spans:
        kernel.read_buffered(dest_fd, off, length)
    src_fd = loops.hold(source, os.O_RDWR)
    stale = [5 * PAGE, 4 * MiB + 7 * PAGE, 8 * MiB + PAGE, 127 * MiB, 129 * MiB + PAGE]
    for off in stale:
        os.pwrite(src_fd, b"new." * (PAGE // 4), off)
    os.fsync(src_fd)
    before = cached(dest_fd)
    report = coherence.coherence(dest)
    found = [off for off, _ in report.stale_ranges]
    assert found == sorted(found) and set(found) <= set(stale)
    assert report.stale == len(found)
    # A stale page still cached after the scan was cached all along: found.
    # (One reclaim took before the scan reached it is not: vanished or unmapped.)
    assert [off for off in stale if cached(dest_fd, off, PAGE)] == \
        [off for off in found if cached(dest_fd, off, PAGE)]
    assert [off for off in stale if cached(dest_fd, off, PAGE)], "reclaim took them all"
    assert report.verdict == "stale" and report.read_in == 0
    assert report.compared + report.vanished == report.resident <= before
    assert cached(dest_fd) <= before
