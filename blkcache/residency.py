"""How much of a range of an open target is in the page cache: a CacheState.

cachestat(2) answers with the dirty and writeback counts; mincore(2) (where
cachestat is missing, or asked for) with the resident count only.  "Unknown"
(``exact`` False) when the kernel will not tell this user; never a guess.
"""

import errno
import os

from . import native
from .constants import INTERFACES, MAX_SIZE, PAGE_SIZE
from .errors import from_errno
from .results import CacheState

#: mincore(2) is scanned in windows of this many bytes, by up to this many threads
#: (the CPUs this process may run on).
MINCORE_WINDOW = 128 << 20
try:
    MINCORE_THREADS = max(1, min(len(os.sched_getaffinity(0)), 8))
except (AttributeError, OSError):
    MINCORE_THREADS = max(1, min(os.cpu_count() or 1, 8))

#: blkcache_cache_stat() flags for each ``interface``.
_INTERFACE_FLAGS = {"auto": 0, "cachestat": native.NO_MINCORE,
                    "mincore": native.FORCE_MINCORE}

UNKNOWN_REASON = ("the kernel does not report the page cache of this device to this "
                  "user (needs write access, ownership of the node or CAP_FOWNER)")

_NO_COUNTS = (None, None, None, None, None)


def _state(target, rng, counts=_NO_COUNTS, interface="none", exact=True, reason=None,
           beyond_end=0):
    return CacheState(target.path, target.device, target.kind, target.size, PAGE_SIZE,
                      rng.offset, rng.length, rng.pages, counts[0], counts[1], counts[2],
                      counts[3], counts[4], interface, exact, reason, beyond_end)


def _beyond_end(target, rng):
    """cachestat(2) counts of every page past rng, which reaches the end, or
    the errno it failed with.

    The kernel does not truncate a block device's page cache when the device
    shrinks (loop capacity change, volume resize): those pages stay, stale,
    and a buffered read returns them if the device grows again.
    """
    end = rng.offset + rng.length
    if end >= MAX_SIZE:
        return (0, 0, 0, 0, 0)
    try:
        return native.cachestat(target.fd, end, MAX_SIZE - end)
    except OSError as exc:
        return exc.errno


def status(target, rng, interface="auto"):
    """CacheState of ``rng`` of ``target``; see Target.status."""
    flags = _INTERFACE_FLAGS.get(interface) if isinstance(interface, str) else None
    if flags is None:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}")
    to_end = rng.offset + rng.length >= target.size
    extra = None
    if interface != "mincore" and to_end:
        extra = _beyond_end(target, rng)
    if rng.length == 0:
        return _empty(target, rng, extra, interface)
    try:
        st = native.cache_stat(target.fd, rng.offset, rng.length, flags, MINCORE_WINDOW,
                               MINCORE_THREADS, target.path)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        used = "mincore" if interface == "mincore" else "cachestat"
        return _state(target, rng, interface=used, exact=False, reason=UNKNOWN_REASON,
                      beyond_end=None)
    if st[5] == native.IF_MINCORE:
        return _state(target, rng, (st[0], None, None, None, None), "mincore",
                      beyond_end=None if to_end else 0)
    if extra is None:
        return _state(target, rng, st, "cachestat")
    if isinstance(extra, int):
        raise from_errno(extra, target.path)
    return _state(target, rng, (st[0] + extra[0], st[1] + extra[1], st[2] + extra[2],
                                st[3] + extra[3], st[4] + extra[4]),
                  "cachestat", beyond_end=extra[0])


def _empty(target, rng, extra, interface):
    """The state of an empty range (a device of size 0): only what is cached
    past its end, if anything."""
    if extra == errno.EPERM:
        return _state(target, rng, interface="cachestat", exact=False,
                      reason=UNKNOWN_REASON, beyond_end=None)
    if isinstance(extra, int) and (extra != errno.ENOSYS or interface != "auto"):
        raise from_errno(extra, target.path)
    if extra is None or isinstance(extra, int):
        return _state(target, rng, (0, 0, 0, 0, 0), beyond_end=None)
    return _state(target, rng, extra, "cachestat", beyond_end=extra[0])
