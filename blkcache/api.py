"""The blkcache Python API: status, drop and verify a device's page cache.

Everything the command line does is here; the CLI only renders results.
Each public function opens the path once (read-only, non-blocking, close on
exec, no controlling tty), checks its type with fstat on that fd, and works
on the fd alone.
"""

import errno
import os
import stat
import time
from dataclasses import asdict
from typing import Optional

from . import caps, failures, safeopen, sizes
from ._native import ffi, lib
from .errors import (
    CannotTellError,
    DirtyPagesError,
    InvalidRangeError,
    MethodUnavailableError,
    UsageError,
    WritebackError,
    WritebackFailedBefore,
    from_errno,
)
from .record import Record, record
from .sizes import format_size, parse_size

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

INTERFACES = ("auto", "cachestat", "mincore")
METHODS = ("auto", "ioctl", "helper", "fadvise")

#: How many times drop() retries pages that survived (readahead in flight).
DEFAULT_RETRIES = 6
_FIRST_DELAY = 0.01

#: mincore(2) is scanned in windows of this many bytes, by up to this many threads
#: (the CPUs this process may run on).
MINCORE_WINDOW = 128 << 20
try:
    MINCORE_THREADS = max(1, min(len(os.sched_getaffinity(0)), 8))
except (AttributeError, OSError):
    MINCORE_THREADS = max(1, min(os.cpu_count() or 1, 8))

#: blkcache_cache_stat() flags for each ``interface``.
_INTERFACE_FLAGS = {"auto": 0, "cachestat": lib.BLKCACHE_NO_MINCORE,
                    "mincore": lib.BLKCACHE_FORCE_MINCORE}

UNKNOWN_REASON = ("the kernel does not report the page cache of this device to this "
                  "user (needs write access, ownership of the node or CAP_FOWNER)")


def _privilege():
    """blkcache.privilege, imported when a drop needs it (it costs start-up:
    subprocess), not for status, verify or a drop with CAP_SYS_ADMIN."""
    from . import privilege

    return privilege


def _raise_errno(path):
    raise from_errno(ffi.errno, path)


@record
class CacheState(Record):
    """Page-cache state of a byte range of a device or file.

    ``cached``, ``dirty``, ``writeback``, ``evicted`` and ``recently_evicted``
    are page counts, or None when the kernel did not tell (``exact`` False:
    see ``reason``; mincore(2) never tells dirty or writeback counts).
    """

    path: str
    device: str
    kind: str               # "block" or "file"
    size: int               # bytes
    page_size: int
    offset: int             # page aligned start of the range
    length: int             # bytes, whole pages (the last may pass the end;
                            # short only where 2^63-1 bytes cuts the last page)
    pages: int              # pages in the range
    cached: Optional[int]
    dirty: Optional[int]
    writeback: Optional[int]
    evicted: Optional[int]
    recently_evicted: Optional[int]
    interface: str          # "cachestat", "mincore" or "none" (empty range)
    exact: bool
    reason: Optional[str] = None
    #: Pages cached past the end of the device (included in the counts above):
    #: a block device that shrank keeps them, and shows them again if it grows.
    #: None where mincore(2) answered, which cannot see past the end.
    beyond_end: Optional[int] = 0

    def __init__(self, path, device, kind, size, page_size, offset, length, pages, cached,
                 dirty, writeback, evicted, recently_evicted, interface, exact, reason=None,
                 beyond_end=0):
        self.__dict__.update(
            path=path, device=device, kind=kind, size=size, page_size=page_size,
            offset=offset, length=length, pages=pages, cached=cached, dirty=dirty,
            writeback=writeback, evicted=evicted, recently_evicted=recently_evicted,
            interface=interface, exact=exact, reason=reason, beyond_end=beyond_end)

    @property
    def cached_bytes(self):
        return None if self.cached is None else self.cached * self.page_size

    @property
    def clean(self):
        """True: no page cached; False: some are; None: cannot tell."""
        return None if self.cached is None else self.cached == 0

    def to_dict(self):
        data = asdict(self)
        data["cached_bytes"] = self.cached_bytes
        return data


@record
class DropResult(Record):
    """What drop() did: the method used, the states before and after."""

    path: str
    device: str
    method: str             # "ioctl", "helper" or "fadvise"
    attempts: int
    before: CacheState
    after: CacheState
    #: Set when auto had to fall back to posix_fadvise on a whole block device.
    warning: Optional[str] = None

    def __init__(self, path, device, method, attempts, before, after, warning=None):
        self.__dict__.update(path=path, device=device, method=method, attempts=attempts,
                             before=before, after=after, warning=warning)

    @property
    def remaining(self):
        """Pages still cached after the drop, None when unknown."""
        return self.after.cached

    @property
    def dropped(self):
        if self.before.cached is None or self.after.cached is None:
            return None
        return max(0, self.before.cached - self.after.cached)

    @property
    def complete(self):
        """True when the range is known to hold no cached page."""
        return self.after.clean is True

    def to_dict(self):
        return {"path": self.path, "device": self.device, "method": self.method,
                "attempts": self.attempts, "dropped": self.dropped,
                "remaining": self.remaining, "complete": self.complete,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "warning": self.warning}


@record
class Verification(Record):
    """verify(): "clean", "resident" or "unknown", with the state behind it."""

    verdict: str
    state: CacheState

    def __init__(self, verdict, state):
        self.__dict__.update(verdict=verdict, state=state)

    def to_dict(self):
        return {"verdict": self.verdict, **self.state.to_dict()}


class Range:
    """A validated, page-aligned byte range of a target (internal: a plain
    class, since each dataclass costs start-up time)."""

    __slots__ = ("offset", "length")

    def __init__(self, offset, length):
        self.offset = offset
        self.length = length

    def __eq__(self, other):
        return isinstance(other, Range) and (self.offset, self.length) == \
            (other.offset, other.length)

    def __repr__(self):
        return f"Range(offset={self.offset}, length={self.length})"

    @property
    def pages(self):
        return -(-self.length // PAGE_SIZE)


class Target:
    """An open block device or regular file.  Use as a context manager.

    >>> with Target("/dev/loop0") as t:
    ...     t.status().cached
    """

    def __init__(self, path):
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        self.path = path
        self.fd = -1
        if path == "":
            raise FileNotFoundError(errno.ENOENT, "empty path", path)
        # Type-checked before anything is opened (see safeopen): a directory,
        # FIFO, socket or character device raises UnsupportedFileError.
        self.fd, st, self.device = safeopen.open_target(path, OPEN_FLAGS)
        try:
            if stat.S_ISBLK(st.st_mode):
                self.kind = "block"
                self.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                size = ffi.new("uint64_t *")
                if lib.blkcache_device_size(self.fd, size) != 0:
                    _raise_errno(path)
                self.size = size[0]
            else:
                self.kind, self.rdev, self.size = "file", None, max(st.st_size, 0)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- ranges --------------------------------------------------------------

    def range(self, offset=0, length=None):
        """Validate offset/length (ints or size strings) and widen to pages."""
        if type(offset) is int and offset == 0 and length is None:
            # The whole target (the common case, without parsing).
            return Range(0, min(-(-self.size // PAGE_SIZE) * PAGE_SIZE, sizes.MAX_SIZE))
        offset = parse_size(offset, "offset")
        if length is not None:
            length = parse_size(length, "length")
            if length == 0:
                raise InvalidRangeError("length must be greater than zero",
                                        self.path)
        if offset and offset >= self.size:
            raise InvalidRangeError(
                f"offset {offset} is beyond the end of the device "
                f"({self.size} bytes)", self.path)
        if length is None:
            length = self.size - offset
        elif length > self.size - offset:
            raise InvalidRangeError(
                f"range {offset}+{length} ends beyond the end of the device "
                f"({self.size} bytes)", self.path)
        start = offset // PAGE_SIZE * PAGE_SIZE
        # Rounded up to a page, but never past 2^63-1, which off_t cannot
        # pass (a device within a page of 8 EiB).
        end = min(-(-(offset + length) // PAGE_SIZE) * PAGE_SIZE, sizes.MAX_SIZE)
        return Range(start, end - start)

    def whole(self, rng):
        return rng.offset == 0 and rng.offset + rng.length >= self.size

    def to_end(self, rng):
        """Whether rng reaches the end of the device (and so takes in the pages
        cached past it: a block device that shrank keeps those)."""
        return rng.offset + rng.length >= self.size

    # -- status ---------------------------------------------------------------

    def _state(self, rng, cached=None, dirty=None, writeback=None, evicted=None,
               recently_evicted=None, interface="none", exact=True, reason=None,
               beyond_end=0):
        return CacheState(self.path, self.device, self.kind, self.size, PAGE_SIZE, rng.offset,
                          rng.length, rng.pages, cached, dirty, writeback, evicted,
                          recently_evicted, interface, exact, reason, beyond_end)

    def _beyond_end(self, rng):
        """cachestat(2) of every page past rng, which reaches the end: a
        struct blkcache_stat, or an errno.

        The kernel does not truncate a block device's page cache when the
        device shrinks (loop capacity change, volume resize): those pages stay,
        stale, and a buffered read returns them if the device grows again.
        """
        end = rng.offset + rng.length
        st = ffi.new("struct blkcache_stat *")
        if end >= sizes.MAX_SIZE:
            return st
        if lib.blkcache_cachestat(self.fd, end, sizes.MAX_SIZE - end, st) != 0:
            return ffi.errno
        return st

    def status(self, offset=0, length=None, interface="auto", rng=None):
        """CacheState of the range; unknown (exact False) when the kernel won't tell.

        A range that reaches the end of the device also counts the pages
        cached past that end (``beyond_end``; cachestat(2) only).
        """
        flags = _INTERFACE_FLAGS.get(interface) if isinstance(interface, str) else None
        if flags is None:
            raise ValueError(f"interface must be one of {', '.join(INTERFACES)}")
        if rng is None:
            rng = self.range(offset, length)
        extra = None
        if interface != "mincore" and self.to_end(rng):
            extra = self._beyond_end(rng)
        if rng.length == 0:
            if extra == errno.EPERM:
                return self._state(rng, interface="cachestat", exact=False,
                                   reason=UNKNOWN_REASON, beyond_end=None)
            if isinstance(extra, int) and (extra != errno.ENOSYS or interface != "auto"):
                raise from_errno(extra, self.path)
            if extra is None or isinstance(extra, int):
                return self._state(rng, 0, 0, 0, 0, 0, beyond_end=None)
            return self._state(rng, extra.nr_cache, extra.nr_dirty, extra.nr_writeback,
                               extra.nr_evicted, extra.nr_recently_evicted,
                               interface="cachestat", beyond_end=extra.nr_cache)
        st = ffi.new("struct blkcache_stat *")
        if lib.blkcache_cache_stat(self.fd, rng.offset, rng.length, flags,
                                   MINCORE_WINDOW, MINCORE_THREADS, st) != 0:
            err = ffi.errno
            if err == errno.EPERM:
                used = "mincore" if interface == "mincore" else "cachestat"
                return self._state(rng, interface=used, exact=False, reason=UNKNOWN_REASON,
                                   beyond_end=None)
            raise from_errno(err, self.path)
        if st.interface == lib.BLKCACHE_IF_MINCORE:
            return self._state(rng, st.nr_cache, interface="mincore",
                               beyond_end=None if self.to_end(rng) else 0)
        if extra is None:
            return self._state(rng, st.nr_cache, st.nr_dirty, st.nr_writeback,
                               st.nr_evicted, st.nr_recently_evicted, interface="cachestat")
        if isinstance(extra, int):
            raise from_errno(extra, self.path)
        return self._state(rng, st.nr_cache + extra.nr_cache, st.nr_dirty + extra.nr_dirty,
                           st.nr_writeback + extra.nr_writeback,
                           st.nr_evicted + extra.nr_evicted,
                           st.nr_recently_evicted + extra.nr_recently_evicted,
                           interface="cachestat", beyond_end=extra.nr_cache)

    # -- drop -----------------------------------------------------------------

    def resolve_method(self, method, rng):
        """(method to use, warning or None) for ``method`` ("auto" picks one).

        The warning is set when auto falls back to posix_fadvise on a whole
        block device; the helper is probed once for both answers.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if method == "fadvise":
            return method, None
        if method == "auto":
            if not (self.kind == "block" and self.whole(rng)):
                return "fadvise", None
            if caps.has_sys_admin():
                return "ioctl", None    # what privilege.auto_method() says first
            choice = _privilege().auto_method()
            if choice.method == "fadvise":
                return choice.method, _privilege().fallback_warning(choice)
            return choice.method, None
        if self.kind != "block":
            raise MethodUnavailableError(
                "BLKFLSBUF works on block devices only", self.path,
                fix="use --method fadvise")
        if not self.whole(rng):
            raise MethodUnavailableError(
                "BLKFLSBUF drops the whole device, not a range", self.path,
                fix="drop a range with --method fadvise")
        if method == "helper":
            _privilege().require_helper(self.path)
        elif not caps.has_sys_admin():
            raise MethodUnavailableError(
                "BLKFLSBUF needs CAP_SYS_ADMIN, which this process lacks",
                self.path, fix=_privilege().ioctl_fix())
        return method, None

    def _sync(self, rng, before, interface):
        if lib.blkcache_datasync(self.fd) != 0:
            err = ffi.errno
            after = self.status(rng=rng, interface=interface)
            # The kernel tells each open file once and marks the pages clean:
            # remember it, or the next drop would discard the only copy.
            try:
                record, problem = failures.record(self.fd, self.path, err, before.dirty), None
            except OSError as exc:
                record, problem = None, f"{exc.strerror or exc}: {exc.filename}"
            raise WritebackError(err, self.path, before, after, record, problem)

    def _drop_once(self, method, rng):
        if method == "helper":
            _privilege().run_helper(self.fd, self.path)
            return
        if method == "ioctl":
            rc = lib.blkcache_flush_buffers(self.fd)
        else:
            # Length 0 is "to the end of the cache": pages past the end of a
            # device that shrank go too.
            length = 0 if self.to_end(rng) else rng.length
            rc = lib.blkcache_drop_range(self.fd, rng.offset, length)
        if rc != 0:
            _raise_errno(self.path)

    def drop(self, offset=0, length=None, method="auto", expect_clean=False,
             retries=DEFAULT_RETRIES, interface="auto", discard_failed=False):
        """Write back dirty pages, drop the range's cache, verify; a DropResult.

        Order: fdatasync (a failure raises WritebackError and nothing is
        dropped), then BLKFLSBUF (``ioctl`` in process, or ``helper``: the
        setcap helper blkcache-flush on this fd) or posix_fadvise(DONTNEED),
        then a status.  ``method="auto"`` picks ioctl, helper, fadvise in
        that order (see blkcache.privilege); falling back to fadvise on a
        whole block device sets DropResult.warning.
        Pages that survive (readahead in flight) are retried up to ``retries``
        times with a growing pause; mapped pages survive every method.

        With ``expect_clean``: if any page is dirty or under writeback,
        DirtyPagesError is raised before anything is written or dropped; if
        the kernel will not tell, CannotTellError.

        A failed write-back is recorded (blkcache.failures); until
        ``discard_failed=True`` says the cached data may go, later drops of
        that device raise WritebackFailedBefore and drop nothing.
        """
        rng = self.range(offset, length)
        failure = failures.lookup(self.fd)
        if failure is not None and not discard_failed:
            raise WritebackFailedBefore(
                f"{failure.describe()}: its cached pages may be the only copy of that "
                "data; nothing was dropped (save what is needed, then drop with "
                "--discard-failed)", self.path, failure)
        method, warning = self.resolve_method(method, rng)
        before = self.status(rng=rng, interface=interface)
        if expect_clean:
            if before.dirty is None or before.writeback is None:
                raise CannotTellError(
                    "cannot tell whether pages are dirty "
                    f"({before.reason or 'mincore(2) does not report dirty pages'}); "
                    "nothing was flushed or dropped", self.path, before)
            if before.dirty or before.writeback:
                raise DirtyPagesError(
                    f"{before.dirty} dirty and {before.writeback} writeback "
                    "pages on a device expected clean; nothing was flushed or dropped",
                    self.path, before)
        attempts = 0
        delay = _FIRST_DELAY
        while True:
            attempts += 1
            self._sync(rng, before, interface)
            self._drop_once(method, rng)
            after = self.status(rng=rng, interface=interface)
            if after.clean is not False or attempts > retries:
                break
            time.sleep(delay)
            delay *= 2
        if failure is not None:
            failures.clear(self.fd)
        return DropResult(self.path, self.device, method, attempts, before, after, warning)

    def verify(self, offset=0, length=None, interface="auto"):
        """Verification: "clean" only when the range is known to hold no page."""
        state = self.status(offset, length, interface)
        verdict = {True: "clean", False: "resident", None: "unknown"}[state.clean]
        return Verification(verdict, state)


#: At most this many devices in one call of open_targets() (and the CLI).
MAX_TARGETS = 256


def open_targets(paths, stack):
    """Open every path (at most MAX_TARGETS) into ``stack``, an ExitStack.

    All are opened and type-checked before any is used, so bad input stops a
    multi-device call before anything changes.
    """
    paths = list(paths)
    if len(paths) > MAX_TARGETS:
        raise UsageError(f"too many devices: {len(paths)} (at most {MAX_TARGETS})")
    return [stack.enter_context(Target(path)) for path in paths]


def status(path, offset=0, length=None, interface="auto"):
    """CacheState of ``path`` (a block device or regular file)."""
    with Target(path) as target:
        return target.status(offset, length, interface)


def drop(path, offset=0, length=None, method="auto", expect_clean=False,
         retries=DEFAULT_RETRIES, interface="auto", discard_failed=False):
    """Sync, drop and verify the page cache of ``path``; see Target.drop."""
    with Target(path) as target:
        return target.drop(offset, length, method, expect_clean, retries, interface,
                           discard_failed)


def verify(path, offset=0, length=None, interface="auto"):
    """Verification of ``path``: clean, resident or unknown."""
    with Target(path) as target:
        return target.verify(offset, length, interface)


__all__ = ["CacheState", "DropResult", "Verification", "Target", "status", "drop",
           "verify", "open_targets", "MAX_TARGETS", "format_size", "parse_size", "PAGE_SIZE"]
