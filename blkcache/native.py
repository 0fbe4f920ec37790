"""The native facade: one thin function per C function of csrc/blkcache.h.

The only module that touches the cffi module blkcache._native (``ffi``,
``lib``).  Each function takes plain ints and Python buffers, returns plain
Python values, and turns the C convention (-1 with errno) into
``OSError(errno, strerror, path)``; ``path`` only names the file in that error.
"""

import errno
import os

from ._native import ffi, lib

#: struct blkcache_stat.interface
IF_CACHESTAT = lib.BLKCACHE_IF_CACHESTAT
IF_MINCORE = lib.BLKCACHE_IF_MINCORE
#: blkcache_cache_stat() flags
FORCE_MINCORE = lib.BLKCACHE_FORCE_MINCORE
NO_MINCORE = lib.BLKCACHE_NO_MINCORE


def _error(path):
    err = ffi.errno
    return OSError(err, os.strerror(err), path)


def device_size(fd, path=None):
    """ioctl BLKGETSIZE64: a block device's size in bytes."""
    size = ffi.new("uint64_t *")
    if lib.blkcache_device_size(fd, size) != 0:
        raise _error(path)
    return size[0]


def cachestat(fd, offset, length, path=None):
    """cachestat(2) of a range: (cache, dirty, writeback, evicted, recently_evicted)."""
    st = ffi.new("struct blkcache_stat *")
    if lib.blkcache_cachestat(fd, offset, length, st) != 0:
        raise _error(path)
    return (st.nr_cache, st.nr_dirty, st.nr_writeback, st.nr_evicted,
            st.nr_recently_evicted)


def cache_stat(fd, offset, length, flags, window, threads, path=None):
    """cachestat(2), else mincore(2) (see ``flags``): the five counts of
    cachestat() and the interface that answered (IF_CACHESTAT, IF_MINCORE)."""
    st = ffi.new("struct blkcache_stat *")
    if lib.blkcache_cache_stat(fd, offset, length, flags, window, threads, st) != 0:
        raise _error(path)
    return (st.nr_cache, st.nr_dirty, st.nr_writeback, st.nr_evicted,
            st.nr_recently_evicted, st.interface)


def datasync(fd, path=None):
    """fdatasync(2)."""
    if lib.blkcache_datasync(fd) != 0:
        raise _error(path)


def flush_buffers(fd, path=None):
    """ioctl BLKFLSBUF: write back and drop a whole block device's cache."""
    if lib.blkcache_flush_buffers(fd) != 0:
        raise _error(path)


def drop_range(fd, offset, length, path=None):
    """posix_fadvise(POSIX_FADV_DONTNEED); length 0 is "to the end of the cache"."""
    if lib.blkcache_drop_range(fd, offset, length) != 0:
        raise _error(path)


def disk_seq(fd, path=None):
    """ioctl BLKGETDISKSEQ: the disk sequence number (ENOTTY before Linux 5.15)."""
    out = ffi.new("uint64_t *")
    if lib.blkcache_disk_seq(fd, out) != 0:
        raise _error(path)
    return int(out[0])


def logical_block_size(fd, path=None):
    """ioctl BLKSSZGET: the logical block size in bytes (0 if the driver says 0)."""
    out = ffi.new("unsigned int *")
    if lib.blkcache_logical_block_size(fd, out) != 0:
        raise _error(path)
    return out[0]


def resident_runs(fd, offset, length, max_runs, path=None):
    """mincore(2) of a range: a list of at most ``max_runs`` (offset, length)
    byte ranges of resident pages."""
    runs = ffi.new("uint64_t[]", 2 * max_runs)
    nruns = ffi.new("uint64_t *")
    if lib.blkcache_resident_runs(fd, offset, length, runs, max_runs, nruns) != 0:
        raise _error(path)
    return [(runs[2 * i], runs[2 * i + 1]) for i in range(nruns[0])]


#: blkcache_compare_resident(): what a page of ``result`` asks and tells.
PAGE_SKIP = lib.BLKCACHE_PAGE_SKIP
PAGE_WANTED = lib.BLKCACHE_PAGE_WANTED
PAGE_GONE = lib.BLKCACHE_PAGE_GONE
PAGE_SAME = lib.BLKCACHE_PAGE_SAME
PAGE_DIFFERS = lib.BLKCACHE_PAGE_DIFFERS


def compare_resident(fd, offset, length, disk, disk_at, disk_valid, result, path=None):
    """Compare the cached pages of a range with the device's bytes, reading
    no page in: ``disk[disk_at:]`` (a buffer) holds the device's bytes of the
    range, the first ``disk_valid`` of them valid.  ``result`` (a writable
    buffer, a byte per page): PAGE_WANTED or PAGE_SKIP in, PAGE_GONE,
    PAGE_SAME or PAGE_DIFFERS out for the pages wanted.  Returns the major
    faults taken meanwhile (pages read in after all: normally 0)."""
    faults = ffi.new("uint64_t *")
    with ffi.from_buffer(disk) as base, \
            ffi.from_buffer("unsigned char[]", result, require_writable=True) as res:
        if lib.blkcache_compare_resident(fd, offset, length, base + disk_at, disk_valid,
                                         res, faults) != 0:
            raise _error(path)
    return faults[0]


def scan_holders(proc, rdev, nodes=(), skip=(-1, -1), path=None):
    """Processes under ``proc`` with a descriptor on block device ``rdev`` or a
    mapping of it (``nodes``: (st_dev, st_ino) of its device nodes), but not
    ``skip`` (pid, fd): ([(pid, fd), ...] in pid order, fd -1 for a mapping,
    number of processes that could not be read)."""
    flat = ffi.new("uint64_t[]", [x for pair in nodes for x in pair] or [0])
    nout = ffi.new("uint64_t *")
    unreadable = ffi.new("uint64_t *")
    room = 64
    while True:
        out = ffi.new("struct blkcache_holder[]", room)
        if lib.blkcache_scan_holders(os.fsencode(proc), rdev, flat, len(nodes), skip[0],
                                     skip[1], out, room, nout, unreadable) == 0:
            break
        if ffi.errno != errno.ENOBUFS:
            raise _error(path)
        room = nout[0] + 64      # processes came meanwhile: room to spare
    return [(out[i].pid, out[i].fd) for i in range(nout[0])], unreadable[0]


def effective_caps():
    """The effective capability set (capget(2)) as an int bit mask."""
    mask = ffi.new("uint64_t *")
    if lib.blkcache_effective_caps(mask) != 0:
        raise _error(None)
    return mask[0]
