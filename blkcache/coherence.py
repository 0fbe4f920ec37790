"""Stale-page detection: compare the cached bytes of a device with the device.

For every page resident in the page cache (mincore(2) over mappings of at
most 128 MiB, one window at a time, so memory stays bounded), the cached bytes
(read through a MADV_RANDOM mapping: no readahead adds pages, and a page that
is no longer resident is not read at all) are compared with the bytes on the
device (an O_DIRECT read, aligned to the logical block size).

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
#: Resident runs are compared in chunks of at most this many bytes.
CHUNK = 1 << 20
#: At most this many ranges are kept per kind (counts stay exact).
MAX_RANGES = 1024

VERDICTS = ("coherent", "stale", "dirty", "unknown")


@dataclass(frozen=True)
class Coherence:
    """Result of a coherence scan of a byte range of a device or file.

    ``verdict``: "coherent" (every clean cached page matches the device),
    "stale" (some cached page differs), "dirty" (no stale page, but dirty or
    write-back pages could not be compared) or "unknown" (see ``reason``).
    Page counts: ``resident`` when the map was taken, ``compared``,
    ``stale``, ``dirty`` (dirty or under write-back, not compared),
    ``vanished`` (evicted before they could be read, not compared).
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


class _Scan:
    def __init__(self, target, lbs):
        self.target = target
        self.lbs = lbs
        # Direct reads go in units of whole logical blocks and whole pages.
        self.unit = max(lbs, PAGE_SIZE)
        self.stale = _Ranges()
        self.dirty = _Ranges()
        self.vanished = _Ranges()
        self.compared = 0
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
        self.cached = bytearray(CHUNK)
        self.vec = bytearray(CHUNK // PAGE_SIZE)
        self.direct = mmap.mmap(-1, CHUNK + 2 * self.unit)  # page aligned

    def close(self):
        self.direct.close()
        for fd in (self.map_fd, self.direct_fd):
            os.close(fd)

    def dirty_pages(self, offset, length):
        """The set of page offsets in the range that are dirty or under write-back."""
        path = self.target.path
        _, dirty, writeback, _, _ = native.cachestat(self.map_fd, offset, length, path)
        if not (dirty or writeback):
            return set()
        out = set()
        for page, _ in _split(offset, length, PAGE_SIZE):
            _, dirty, writeback, _, _ = native.cachestat(self.map_fd, page, PAGE_SIZE, path)
            if dirty or writeback:
                out.add(page)
        return out

    def read_direct(self, offset, length):
        """Device bytes of [offset, offset+length) (unit aligned) into self.direct."""
        view = memoryview(self.direct)
        done = 0
        try:
            while done < length:
                n = os.preadv(self.direct_fd, [view[done:length]], offset + done)
                if n <= 0:
                    break
                done += n
        finally:
            view.release()
        return done

    def chunk(self, offset, length):
        size = self.target.size
        # Pages past the end of the device cannot be mapped: stop at its end.
        length = min(length, page_ceil(size) - offset)
        npages = length // PAGE_SIZE
        dirty = self.dirty_pages(offset, length)
        native.read_resident(self.map_fd, offset, length, self.cached, self.vec,
                             self.target.path)
        if not dirty and length % self.unit == 0 and offset % self.unit == 0 \
                and offset + length <= size \
                and b"\0" not in self.vec[:npages]:
            # Fast path: every page resident and clean; one comparison.
            n = self.read_direct(offset, length)
            if n == length and self.cached[:length] == self.direct[:length]:
                self.compared += npages
                return
        # Units (logical blocks >= a page) that hold a dirty page are not read
        # with O_DIRECT at all: the kernel would write the dirty page back first.
        unit = self.unit
        dirty_units = {p // unit * unit for p in dirty}
        wanted = []   # page indexes to compare
        for i in range(npages):
            page = offset + i * PAGE_SIZE
            if page in dirty or page // unit * unit in dirty_units:
                self.dirty.add(page, PAGE_SIZE)
            elif not self.vec[i]:
                self.vanished.add(page, PAGE_SIZE)
            else:
                wanted.append(i)
        if not wanted:
            return
        first = offset + wanted[0] * PAGE_SIZE
        last = offset + (wanted[-1] + 1) * PAGE_SIZE
        start = first // unit * unit
        stop = page_ceil(last, unit)
        # One direct read spanning the compared pages, split around dirty units.
        pieces, pos = [], start
        for du in sorted(u for u in dirty_units if start <= u < stop):
            if du > pos:
                pieces.append((pos, du - pos))
            pos = du + unit
        if pos < stop:
            pieces.append((pos, stop - pos))
        got = {}
        for p_off, p_len in pieces:
            n = self.read_direct(p_off, p_len)
            got[p_off] = (p_len, bytes(self.direct[:n]))
        ondisk = {}
        for p_off, (p_len, data) in got.items():
            for i in range(0, p_len, PAGE_SIZE):
                ondisk[p_off + i] = data[i:i + PAGE_SIZE]
        candidates = []
        for i in wanted:
            page = offset + i * PAGE_SIZE
            valid = min(PAGE_SIZE, size - page)
            disk = ondisk.get(page, b"")[:valid]
            cached = self.cached[i * PAGE_SIZE:i * PAGE_SIZE + valid]
            if len(disk) < valid:
                # The device ended early (shrunk?): cannot compare this page.
                self.vanished.add(page, PAGE_SIZE)
            elif cached != disk:
                candidates.append(page)
            else:
                self.compared += 1
        # A page that became dirty during the read differs legitimately.
        now_dirty = self.dirty_pages(offset, length) if candidates else set()
        for page in candidates:
            if page in now_dirty:
                self.dirty.add(page, PAGE_SIZE)
            else:
                self.compared += 1
                self.stale.add(page, PAGE_SIZE)


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
    resident = 0
    try:
        try:
            for w_off, w_len, runs in resident_runs(target, rng.offset, rng.length):
                for r_off, r_len in runs:
                    resident += r_len // PAGE_SIZE
                    for c_off, c_len in _split(r_off, r_len, CHUNK):
                        scan.chunk(c_off, c_len)
                if progress is not None:
                    progress(w_off + w_len - rng.offset, rng.length)
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
