"""A test-only stand-in for proactive reclaim: evict a few random cached pages.

The machines this suite runs on page out cache at any moment (DAMON
``pageout``, memory cgroups, balloon drivers), even pages read 50 ms
earlier.  A count-sensitive test must hold then: a count blkcache reports is
bounded by the oracle's readings before and after it, and "nothing changed"
is judged with margins reclaim cannot reach.  To exercise that on every run,
not only when the reclaimer happens to strike, the oracle (tests/kernel.py)
calls :func:`strike` between the steps of such tests: it drops a few random
clean cached pages of the file, a page (with the rest of its folio, as
reclaim does) at a time, with ``posix_fadvise(DONTNEED)`` on a descriptor of
its own.

BLKCACHE_TEST_EVICT=N evicts N pages per strike (default 2: cheap, and still
enough to break an exact comparison); 0 turns it off.  Dirty pages and pages
under write-back are never chosen: DONTNEED would start their write-back,
which reclaim does not do to a test's pages at once.
"""

import os
import random
import stat

PAGES = int(os.environ.get("BLKCACHE_TEST_EVICT", "2"))
PAGE = os.sysconf("SC_PAGE_SIZE")
_rng = random.Random()
evicted = 0          # pages evicted so far in this process (for the tests' reports)
_by_file = {}        # the same, per file (see file_key)


def file_key(fd):
    """What shares one page cache: the block device, or the file's inode."""
    st = os.fstat(fd)
    return ("block", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev,
                                                                   st.st_ino)


def evicted_from(fd):
    """Pages the stressor evicted so far from the file open as fd."""
    return _by_file.get(file_key(fd), 0)


def _cached_page(fd, stat, size):
    """A random page of fd that is cached, clean and not under write-back, or None.

    Descends by halves, weighting each half by its cached pages: about 2 log2(pages)
    cachestat calls, cheap even on a 1 TiB device.
    """
    lo, hi = 0, (size + PAGE - 1) // PAGE
    count = stat(fd, 0, hi * PAGE)["nr_cache"]
    while count and hi - lo > 1:
        mid = (lo + hi) // 2
        left = stat(fd, lo * PAGE, (mid - lo) * PAGE)["nr_cache"]
        if _rng.randrange(count) < left:
            hi, count = mid, left
        else:
            lo, count = mid, count - left
    if not count:
        return None
    page = stat(fd, lo * PAGE, PAGE)
    if page["nr_cache"] != 1 or page["nr_dirty"] or page["nr_writeback"]:
        return None
    return lo


def _evict(fd, stat, page):
    """Evict the page (and, as reclaim does, the rest of its folio): DONTNEED on
    the page, then on the aligned 2, 4 ... 512 pages around it until the page
    is gone (DONTNEED skips a large folio it covers only in part).  Never a
    span holding dirty pages or pages under write-back.  The pages evicted."""
    for order in range(10):
        span = 1 << order
        first = page // span * span
        before = stat(fd, first * PAGE, span * PAGE)
        if before["nr_dirty"] or before["nr_writeback"]:
            return 0
        os.posix_fadvise(fd, first * PAGE, span * PAGE, os.POSIX_FADV_DONTNEED)
        if not stat(fd, page * PAGE, PAGE)["nr_cache"]:
            return before["nr_cache"] - stat(fd, first * PAGE, span * PAGE)["nr_cache"]
    return 0


def strike(fd, stat, pages=None):
    """Evict about ``pages`` (at most BLKCACHE_TEST_EVICT, the default) random
    clean cached pages of the file open as fd (whole folios: a large one may
    count for more); the number evicted."""
    global evicted
    pages = PAGES if pages is None else min(pages, PAGES)
    if pages <= 0:
        return 0
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 0               # not reopenable (a socket, an O_PATH fd...): no stress
    done = 0
    try:
        size = os.lseek(own, 0, os.SEEK_END)
        for _ in range(2 * pages):          # a few tries more: a pick may be dirty
            if done >= pages:
                break
            page = _cached_page(own, stat, size)
            if page is None:
                break
            done += _evict(own, stat, page)
    finally:
        os.close(own)
    evicted += done
    if done:
        key = file_key(fd)
        _by_file[key] = _by_file.get(key, 0) + done
    return done
