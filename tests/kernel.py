"""Independent views of kernel state for the tests (ctypes, not blkcache).

The tests check blkcache's answers against these raw syscalls, so a bug in
blkcache's native layer cannot confirm itself.
"""

import ctypes
import mmap
import os
import subprocess

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
