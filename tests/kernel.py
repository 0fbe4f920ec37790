"""Independent views of kernel state for the tests (ctypes, not blkcache).

The tests check blkcache's answers against these raw syscalls, so a bug in
blkcache's native layer cannot confirm itself.
"""

import ctypes
import mmap
import os
import subprocess

import evict
from units import PAGE  # noqa: F401  (kernel.PAGE: the oracle's page size)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_CACHESTAT = 451


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                 "nr_recently_evicted")]


def cachestat(fd, offset=0, length=0):
    """Raw cachestat(2) of fd: a dict of the five counts."""
    rng, out = _Range(offset, length), _Stat()
    rc = _libc.syscall(ctypes.c_long(NR_CACHESTAT), ctypes.c_int(fd), ctypes.byref(rng),
                       ctypes.byref(out), ctypes.c_uint(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return {name: getattr(out, name) for name, _ in _Stat._fields_}


def cached_pages(path, offset=0, length=0):
    """Pages of path resident in the page cache, by raw cachestat(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return cachestat(fd, offset, length)["nr_cache"]
    finally:
        os.close(fd)


class Reading(int):
    """The oracle's count of cached pages, remembering the whole cachestat(2)
    reading and the stressor's evictions so far (for not_dropped)."""

    def __new__(cls, fd, offset=0, length=0):
        stat = cachestat(fd, offset, length)
        obj = super().__new__(cls, stat["nr_cache"])
        obj.stat, obj.stressed = stat, evict.evicted_from(fd)
        return obj


def count(fd, offset=0, length=0, stress=None):
    """The oracle's reading of fd's cached pages (a Reading), then a strike of
    the eviction stressor (tests/evict.py): the test's next step finds a few
    pages fewer, as it may at any moment under proactive reclaim."""
    pages = Reading(fd, offset, length)
    evict.strike(fd, cachestat, stress)
    return pages


def around(fd, measure, offset=0, length=0, stress=None):
    """(before, measure(), after): the oracle's counts just before and just after.

    A count blkcache reports in measure() lies between them (before >= it >=
    after): pages may go at any moment, never come back unless read.  ``stress``
    caps the pages the stressor evicts first (a scenario built on a few pages)."""
    before = count(fd, offset, length, stress)
    value = measure()
    after = cachestat(fd, offset, length)["nr_cache"]
    return before, value, after


def between(before, reported, after, what="blkcache's count"):
    """Assert before >= reported >= after (the oracle's readings around it)."""
    assert before >= reported >= after, \
        f"{what}: {reported} is not within the kernel's {before} (before) .. {after} (after)"


def fill(fd, offset, length, tries=10):
    """Read [offset, offset+length) buffered until every page of it is cached
    (reclaim may take a page between the read and the check: read again); the
    oracle's count of the range, taken right then (a Reading)."""
    want = (length + PAGE - 1) // PAGE
    for _ in range(tries):
        read_buffered(fd, offset, length)
        got = Reading(fd, offset, length)
        if got >= want:
            return got
    raise AssertionError(f"only {got} of {want} pages stay cached after {tries} reads")


def steady(fd, want, setup, measure, offset=0, length=0, tries=5):
    """measure() from a moment when the oracle saw exactly ``want`` cached
    pages of fd (in the range) both just before and just after it: for checks of exact
    output.  When reclaim (or the stressor) took a page, set up and try again."""
    for attempt in range(tries):
        setup()
        if attempt == 0:
            evict.strike(fd, cachestat)      # so that the retry is exercised too
        if cachestat(fd, offset, length)["nr_cache"] == want:
            value = measure()
            if cachestat(fd, offset, length)["nr_cache"] == want:
                return value
    raise AssertionError(f"the kernel never kept {want} pages cached for a whole run")


# A drop removes (nearly) every page of the range; reclaim takes a few percent
# a minute.  "Not dropped" is judged with a margin between the two.
KEPT = 0.5


def not_dropped(fd, before, offset=0, length=0, what="nothing may be dropped"):
    """Assert that no drop took the ``before`` cached pages: a drop (the wrong
    action) leaves (nearly) none.

    Either most of them are still there, or what went is accounted for by
    reclaim: reclaim leaves a shadow entry per page (cachestat's nr_evicted)
    where a drop (BLKFLSBUF, POSIX_FADV_DONTNEED) leaves none and clears those
    there were; and by the stressor, which counts what it took.  ``before``
    is a Reading (count(), fill()) for the second test, or a plain count.
    """
    assert before >= 32, f"the test needs pages cached to mean anything (only {before})"
    now = cachestat(fd, offset, length)
    if now["nr_cache"] >= before * KEPT:
        return now["nr_cache"]
    gone = before - now["nr_cache"]
    if isinstance(before, Reading):
        reclaimed = max(0, now["nr_evicted"] - before.stat["nr_evicted"])
        stressed = evict.evicted_from(fd) - before.stressed
        unexplained = gone - reclaimed - stressed
        assert unexplained <= 16 + before // 10, \
            (f"{what}: {before} pages cached before, {now['nr_cache']} now; {reclaimed} "
             f"reclaimed, {stressed} evicted by the test: {unexplained} dropped")
        return now["nr_cache"]
    raise AssertionError(f"{what}: {before} pages cached before, {now['nr_cache']} now")


def reported_before_drop(before, reported, what="the count before the drop"):
    """Assert a count blkcache took just before dropping lies between the
    oracle's reading ``before`` (pages only go) and what reclaim could have
    left of it by then (the drop itself leaves no later reading to bound it)."""
    assert before >= reported >= before * KEPT, \
        f"{what}: {reported}, the kernel had {before} cached just before"


def dirty_pages(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return cachestat(fd)["nr_dirty"]
    finally:
        os.close(fd)


def read_buffered(fd, offset, length):
    """A buffered read, going through (and filling) the page cache."""
    chunks, pos = [], offset
    while pos < offset + length:
        data = os.pread(fd, min(1 << 20, offset + length - pos), pos)
        if not data:
            break
        chunks.append(data)
        pos += len(data)
    return b"".join(chunks)


def read_direct(path, offset, length):
    """Bytes on the device itself: an O_DIRECT read, bypassing the cache."""
    assert offset % 4096 == 0 and length % 4096 == 0
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        out = bytearray()
        buf = mmap.mmap(-1, min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = os.preadv(fd, [buf], pos)
            want = min(n, offset + length - pos)
            out += buf[:want]
            if n == 0:
                break
            pos += n
        buf.close()
        return bytes(out)
    finally:
        os.close(fd)


def losetup(*args):
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


# Forks from a small interpreter, so that the child's peak RSS (which Linux
# carries across fork and exec) starts small rather than at pytest's size.
_RSS_RUNNER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\n%d %d\n" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def peak_rss(cmd):
    """Run cmd: (exit code, stdout, stderr, peak RSS in bytes)."""
    import sys
    proc = subprocess.run([sys.executable, "-S", "-c", _RSS_RUNNER, *cmd],
                          capture_output=True, text=True)
    tail = proc.stderr.rstrip("\n").rpartition("\n")[2]
    code, maxrss = map(int, tail.split())
    return code, proc.stdout, proc.stderr[:-(len(tail) + 2)], maxrss * 1024
