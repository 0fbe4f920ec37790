"""Stale-page detection: compare the cached bytes of a device with the device.

The resident pages are found with mincore(2) over mappings of at most 128 MiB,
one window at a time (memory stays bounded).  Each run of them is read from
the device once, with O_DIRECT, in chunks of up to 4 MiB (a reader thread
keeps the next chunk coming while this one is compared), and compared in C
with the cached bytes, read through a MADV_RANDOM mapping: no readahead adds
pages, and each group of 16 pages is checked with mincore(2) right before it
is compared, so a page evicted since the map was taken is not read back in.

Nothing is ever written.  Pages that are dirty or under write-back are not
compared: they legitimately differ from the device, and an O_DIRECT read of
their range would first write them back (the kernel flushes dirty pages of a
range before a direct read of it).  They are reported apart, as are pages
evicted between the residency map and the read ("not compared").

Dirty pages can only be told with cachestat(2) (Linux 6.5); without it the
answer is "unknown", never "coherent".
"""

import errno
import mmap
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from . import native
from .constants import PAGE_SIZE
from .residency import UNKNOWN_REASON
from .sizes import page_ceil

#: Residency is mapped in windows of this many bytes (mincore vector: 32 KiB).
WINDOW = 128 << 20
#: Resident runs are read (O_DIRECT) and compared in chunks of at most this
#: many bytes: dd's bs=4M.
CHUNK = 4 << 20
#: At most this many ranges are kept per kind (counts stay exact).
MAX_RANGES = 1024

VERDICTS = ("coherent", "stale", "dirty", "unknown")

_ALL_WANTED = bytes([native.PAGE_WANTED]) * (CHUNK // PAGE_SIZE)


@dataclass(frozen=True)
class Coherence:
    """Result of a coherence scan of a byte range of a device or file.

    ``verdict``: "coherent" (every clean cached page matches the device),
    "stale" (some cached page differs), "dirty" (no stale page, but dirty or
    write-back pages could not be compared) or "unknown" (see ``reason``).
    Page counts: ``resident`` when the map was taken, ``compared``,
    ``stale``, ``dirty`` (dirty or under write-back, not compared),
    ``vanished`` (evicted before they could be read, not compared),
    ``read_in`` (pages the scan read into the cache: evicted in the instant
    between their residency check and their comparison; normally 0).
    Ranges are (offset, length) in bytes, merged, at most MAX_RANGES each
    (``truncated`` says when more were found).
    """

    path: str
    device: str
    kind: str
    size: int
    page_size: int
    offset: int
    length: int
    verdict: str
    resident: Optional[int] = None
    compared: int = 0
    stale: int = 0
    dirty: int = 0
    vanished: int = 0
    read_in: int = 0
    stale_ranges: Tuple[Tuple[int, int], ...] = ()
    dirty_ranges: Tuple[Tuple[int, int], ...] = ()
    vanished_ranges: Tuple[Tuple[int, int], ...] = ()
    truncated: bool = False
    logical_block_size: Optional[int] = None
    elapsed: float = 0.0
    reason: Optional[str] = None

    @property
    def not_compared(self):
        return self.dirty + self.vanished

    def to_dict(self):
        return {"path": self.path, "device": self.device, "kind": self.kind,
                "size": self.size, "page_size": self.page_size, "offset": self.offset,
                "length": self.length, "verdict": self.verdict,
                "resident": self.resident, "compared": self.compared,
                "stale": self.stale, "dirty": self.dirty, "vanished": self.vanished,
                "read_in": self.read_in,
                "stale_ranges": [list(r) for r in self.stale_ranges],
                "dirty_ranges": [list(r) for r in self.dirty_ranges],
                "vanished_ranges": [list(r) for r in self.vanished_ranges],
                "truncated": self.truncated,
                "logical_block_size": self.logical_block_size,
                "elapsed": round(self.elapsed, 6), "reason": self.reason}


class _Ranges:
    """Merged (offset, length) ranges, at most MAX_RANGES kept; exact page count."""

    def __init__(self):
        self.ranges = []
        self.pages = 0
        self.truncated = False

    def add(self, offset, length):
        self.pages += length // PAGE_SIZE
        if self.ranges:
            last_off, last_len = self.ranges[-1]
            if last_off + last_len == offset:
                self.ranges[-1] = (last_off, last_len + length)
                return
        if len(self.ranges) >= MAX_RANGES:
            self.truncated = True
            return
        self.ranges.append((offset, length))


def resident_runs(target, offset, length, window=WINDOW):
    """Yield (window_offset, window_length, runs) for each mincore window.

    ``runs`` is a list of (offset, length) byte ranges of resident pages in
    that window.  Memory is bounded by one window's vector.  Raises
    PermissionError (EPERM) when the kernel would not tell the truth.
    """
    end = min(offset + length, page_ceil(target.size))
    pos = offset
    cap = window // PAGE_SIZE // 2 + 1
    while pos < end:
        wlen = min(window, end - pos)
        yield pos, wlen, native.resident_runs(target.fd, pos, wlen, cap, target.path)
        pos += wlen


def _split(offset, length, size):
    pos, end = offset, offset + length
    while pos < end:
        step = min(size, end - pos)
        yield pos, step
        pos += step


class _Chunk:
    """A run of resident pages and the device's bytes of it (read with O_DIRECT).

    The device's bytes of [start, ...) lie at the start of ``buf``; ``offset``
    is page aligned, ``start`` the unit (logical block, at least a page)
    below it.  ``dirty``: page offsets dirty or under write-back before the
    read (their units were not read); ``unread``: (from, to) byte ranges the
    device did not return (it ended early).
    """

    __slots__ = ("offset", "length", "start", "buf", "dirty", "unread")

    def __init__(self, offset, length, start, buf, dirty, unread):
        self.offset, self.length, self.start, self.buf = offset, length, start, buf
        self.dirty, self.unread = dirty, unread


class _Window:
    """End of a residency window: ``resident`` pages found, ``end`` its end."""

    __slots__ = ("resident", "end")

    def __init__(self, resident, end):
        self.resident, self.end = resident, end


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


_DONE = object()


def _ahead(source, depth):
    """Iterate ``source`` in a thread, at most ``depth`` items ahead.

    The device is read (in the thread) while the pages read before are
    compared (here): both release the GIL.  An exception in ``source`` is
    raised here, in order.
    """
    import queue
    import threading

    items = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:    # handed over, raised in the caller
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=run, name="blkcache-coherence-read", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _Scan:
    #: Chunks read ahead of the one compared (each needs a buffer of CHUNK).
    AHEAD = 1

    def __init__(self, target, lbs):
        self.target = target
        self.lbs = lbs
        # Direct reads go in units of whole logical blocks and whole pages.
        self.unit = max(lbs, PAGE_SIZE)
        self.stale = _Ranges()
        self.dirty = _Ranges()
        self.vanished = _Ranges()
        self.compared = 0
        #: Pages the scan itself read into the cache: one evicted in the
        #: instant between its residency check and its comparison (see
        #: blkcache_compare_resident).  Normally 0.
        self.read_in = 0
        proc = f"/proc/self/fd/{target.fd}"
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        # Separate opens of the very same inode: one plain (the mapping),
        # one O_DIRECT (the device's bytes).
        self.map_fd = os.open(proc, flags)
        try:
            self.direct_fd = os.open(proc, flags | os.O_DIRECT)
        except OSError:
            os.close(self.map_fd)
            raise
        # Page aligned, as O_DIRECT needs; a unit more for an unaligned start.
        self.buffers = [mmap.mmap(-1, CHUNK + 2 * self.unit) for _ in range(self.AHEAD + 2)]
        self.result = bytearray(CHUNK // PAGE_SIZE)

    def close(self):
        for buf in self.buffers:
            buf.close()
        for fd in (self.map_fd, self.direct_fd):
            os.close(fd)

    def dirty_pages(self, offset, length):
        """Sorted page offsets in the range that are dirty or under write-back."""
        path = self.target.path
        _, dirty, writeback, _, _ = native.cachestat(self.map_fd, offset, length, path)
        if not (dirty or writeback):
            return []
        out = []
        for page, _ in _split(offset, length, PAGE_SIZE):
            _, dirty, writeback, _, _ = native.cachestat(self.map_fd, page, PAGE_SIZE, path)
            if dirty or writeback:
                out.append(page)
        return out

    def read_direct(self, buf, at, offset, length):
        """Device bytes of [offset, offset+length) (unit aligned) into buf[at:]."""
        view = memoryview(buf)
        done = 0
        try:
            while done < length:
                n = os.preadv(self.direct_fd, [view[at + done:at + length]], offset + done)
                if n <= 0:
                    break
                done += n
        finally:
            view.release()
        return done

    def read(self, offset, length, index):
        """The _Chunk of [offset, offset+length), read into buffer ``index``.

        Units (logical blocks >= a page) holding a dirty page are not read
        with O_DIRECT at all: the kernel would write the dirty page back first.
        """
        size = self.target.size
        # Pages past the end of the device cannot be mapped: stop at its end.
        length = min(length, page_ceil(size) - offset)
        unit = self.unit
        dirty = self.dirty_pages(offset, length)
        start = offset // unit * unit
        stop = page_ceil(offset + length, unit)
        pieces, pos = [], start
        for du in sorted({p // unit * unit for p in dirty}):
            if du > pos:
                pieces.append((pos, du - pos))
            pos = du + unit
        if pos < stop:
            pieces.append((pos, stop - pos))
        buf, unread = self.buffers[index], []
        for p_off, p_len in pieces:
            n = self.read_direct(buf, p_off - start, p_off, p_len)
            want = min(p_len, size - p_off)
            if n < want:
                unread.append((p_off + n, p_off + want))
        return _Chunk(offset, length, start, index, dirty, unread)

    def compare(self, chunk):
        """Compare the chunk's cached pages with its device bytes; count them."""
        offset, length = chunk.offset, chunk.length
        npages = length // PAGE_SIZE
        result = self.result
        if chunk.dirty or chunk.unread:
            self._mark(chunk, npages)
        else:
            result[:npages] = _ALL_WANTED[:npages]
        valid = min(offset + length, self.target.size) - offset
        self.read_in += native.compare_resident(
            self.map_fd, offset, length, self.buffers[chunk.buf], offset - chunk.start, valid,
            result, self.target.path)
        codes = bytes(result[:npages])
        same = codes.count(native.PAGE_SAME)
        if same == npages:
            self.compared += same
            return
        candidates = []
        for i, code in enumerate(codes):
            page = offset + i * PAGE_SIZE
            if code == native.PAGE_SAME:
                self.compared += 1
            elif code == native.PAGE_GONE:
                self.vanished.add(page, PAGE_SIZE)
            elif code == native.PAGE_DIFFERS:
                candidates.append(page)
        if not candidates:
            return
        # A page that became dirty during the read differs legitimately.
        now_dirty = set(self.dirty_pages(offset, length))
        for page in candidates:
            if page in now_dirty:
                self.dirty.add(page, PAGE_SIZE)
            else:
                self.compared += 1
                self.stale.add(page, PAGE_SIZE)

    def _mark(self, chunk, npages):
        """result: which pages to compare; the others counted dirty or vanished."""
        unit = self.unit
        dirty_units = {p // unit * unit for p in chunk.dirty}
        for i in range(npages):
            page = chunk.offset + i * PAGE_SIZE
            if page // unit * unit in dirty_units:
                self.dirty.add(page, PAGE_SIZE)
                self.result[i] = native.PAGE_SKIP
            elif any(lo <= page < hi or page < lo < page + PAGE_SIZE
                     for lo, hi in chunk.unread):
                # The device ended early (shrunk?): cannot compare this page.
                self.vanished.add(page, PAGE_SIZE)
                self.result[i] = native.PAGE_SKIP
            else:
                self.result[i] = native.PAGE_WANTED

    def chunk(self, offset, length):
        """Read and compare one run of at most CHUNK bytes."""
        self.compare(self.read(offset, length, 0))

    def reads(self, offset, length):
        """_Chunk and _Window items of the range, in order (run in a thread)."""
        count = 0
        for w_off, w_len, runs in resident_runs(self.target, offset, length):
            resident = 0
            for r_off, r_len in runs:
                resident += r_len // PAGE_SIZE
                for c_off, c_len in _split(r_off, r_len, CHUNK):
                    yield self.read(c_off, c_len, count % len(self.buffers))
                    count += 1
            yield _Window(resident, w_off + w_len)

    def run(self, offset, length, progress=None):
        """Compare every resident page of the range; the resident count."""
        resident = 0
        for item in _ahead(self.reads(offset, length), self.AHEAD):
            if isinstance(item, _Window):
                resident += item.resident
                if progress is not None:
                    progress(item.end - offset, length)
            else:
                self.compare(item)
        return resident


def check(target, offset=0, length=None, progress=None, rng=None):
    """Coherence of the cached pages of ``target`` (an open api.Target).

    ``progress``, if given, is called as progress(done_bytes, total_bytes)
    after each window.  Returns a Coherence; never writes.
    """
    started = time.monotonic()
    if rng is None:
        rng = target.range(offset, length)
    base = dict(path=target.path, device=target.device, kind=target.kind,
                size=target.size, page_size=PAGE_SIZE, offset=rng.offset,
                length=rng.length)

    def unknown(reason, **extra):
        return Coherence(verdict="unknown", reason=reason,
                         elapsed=time.monotonic() - started, **base, **extra)

    if rng.length == 0:
        return Coherence(verdict="coherent", resident=0, **base)
    # Dirty pages are told by cachestat(2) only; without it, cannot tell.
    try:
        native.cachestat(target.fd, rng.offset, rng.length, target.path)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return unknown("the kernel has no cachestat(2) (Linux 6.5) to tell dirty "
                           "pages, which a direct read would write back")
        if exc.errno == errno.EPERM:
            return unknown(UNKNOWN_REASON)
        raise
    lbs = PAGE_SIZE
    if target.kind == "block":
        lbs = native.logical_block_size(target.fd, target.path) or 512
    try:
        scan = _Scan(target, lbs)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return unknown("O_DIRECT is not supported here", logical_block_size=lbs)
        raise
    try:
        try:
            resident = scan.run(rng.offset, rng.length, progress)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:
                raise
            return unknown(UNKNOWN_REASON, logical_block_size=lbs)
    finally:
        scan.close()
    if scan.stale.pages:
        verdict = "stale"
    elif scan.dirty.pages:
        verdict = "dirty"
    else:
        verdict = "coherent"
    return Coherence(
        verdict=verdict, resident=resident, compared=scan.compared,
        stale=scan.stale.pages, dirty=scan.dirty.pages, vanished=scan.vanished.pages,
        read_in=scan.read_in,
        stale_ranges=tuple(scan.stale.ranges), dirty_ranges=tuple(scan.dirty.ranges),
        vanished_ranges=tuple(scan.vanished.ranges),
        truncated=scan.stale.truncated or scan.dirty.truncated or scan.vanished.truncated,
        logical_block_size=lbs, elapsed=time.monotonic() - started, **base)


def coherence(path, offset=0, length=None, progress=None):
    """Open ``path`` and run check() on it."""
    from .target import Target

    with Target(path) as target:
        return check(target, offset, length, progress)


__all__ = ["Coherence", "check", "coherence", "resident_runs", "VERDICTS"]
