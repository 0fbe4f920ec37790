"""The native facade: one thin function per C function of csrc/blkcache.h.

The only module that touches the cffi module blkcache._native (``ffi``,
``lib``).  Each function takes plain ints and Python buffers, returns plain
Python values, and turns the C convention (-1 with errno) into
``OSError(errno, strerror, path)``; ``path`` only names the file in that error.
"""

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


def fd_info(fd, path=None):
    """(st_mode, size in bytes, (major, minor) of a block device else (0, 0))."""
    info = ffi.new("struct blkcache_info *")
    if lib.blkcache_fd_info(fd, info) != 0:
        raise _error(path)
    return info.mode, info.size, (info.rdev_major, info.rdev_minor)


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


def read_resident(fd, offset, length, buf, vec, path=None):
    """Copy the resident pages of a range into ``buf`` (a writable buffer of at
    least ``length`` bytes) without reading any page in; ``vec`` (a writable
    buffer of a byte per page) gets 1 for each page copied, 0 for the others."""
    if lib.blkcache_read_resident(fd, offset, length, ffi.from_buffer(buf),
                                  ffi.from_buffer("unsigned char[]", vec)) != 0:
        raise _error(path)


def effective_caps():
    """The effective capability set (capget(2)) as an int bit mask."""
    mask = ffi.new("uint64_t *")
    if lib.blkcache_effective_caps(mask) != 0:
        raise _error(None)
    return mask[0]
