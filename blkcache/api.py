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
from dataclasses import asdict, dataclass, fields
from typing import Optional

from . import caps, failures, safeopen, sizes
from ._native import ffi, lib
from .errors import (
    CannotTellError,
    DirtyPagesError,
    InvalidRangeError,
    MethodUnavailableError,
    StateDirError,
    UnsupportedFileError,
    UsageError,
    WritebackError,
    WritebackFailedBefore,
    from_errno,
)
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


def _opened_path(fd, path):
    """The canonical path of what fd refers to: realpath(path), in one syscall.

    /proc/self/fd/N names what was actually opened; without /proc (or for a
    deleted file) fall back to os.path.realpath, which costs a stat per
    path component.
    """
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if link.startswith("/") and not link.endswith(" (deleted)"):
        return link
    return os.path.realpath(path)


def _privilege():
    """blkcache.privilege, imported when a drop needs it (it costs start-up:
    subprocess), not for status, verify or a drop with CAP_SYS_ADMIN."""
    from . import privilege

    return privilege


def _raise_errno(path):
    raise from_errno(ffi.errno, path)


@dataclass(frozen=True)
class CacheState:
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


_new_object = object.__new__
_STATE_FIELDS = tuple(f.name for f in fields(CacheState))


@dataclass(frozen=True)
class DropResult:
    """What drop() did: the method used, the states before and after."""

    path: str
    device: str
    method: str             # "ioctl", "helper" or "fadvise"
    attempts: int
    before: CacheState
    after: CacheState
    #: Set when auto had to fall back to posix_fadvise on a whole block device.
    warning: Optional[str] = None

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


@dataclass(frozen=True)
class Verification:
    """verify(): "clean", "resident" or "unknown", with the state behind it."""

    verdict: str
    state: CacheState

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

    #: The descriptor; -1 once closed (or when __init__ failed before opening).
    fd = -1

    def __init__(self, path):
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        self.path = path
        if path == "":
            raise FileNotFoundError(errno.ENOENT, "empty path", path)
        # Type-checked before anything is opened (see safeopen): a directory,
        # FIFO, socket or character device raises UnsupportedFileError.
        self.fd = safeopen.open_checked(path, OPEN_FLAGS)
        try:
            info = ffi.new("struct blkcache_info *")
            if lib.blkcache_fd_info(self.fd, info) != 0:
                _raise_errno(path)
            mode = info.mode
            if stat.S_ISBLK(mode):
                self.kind = "block"
                self.rdev = (info.rdev_major, info.rdev_minor)
            elif stat.S_ISREG(mode):
                self.kind = "file"
                self.rdev = None
            else:
                raise UnsupportedFileError(
                    f"not a block device or regular file ({safeopen.kind_name(mode)})",
                    path)
            self.size = info.size
            self.device = _opened_path(self.fd, path)
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
        # CacheState(...) without the generated frozen __init__'s seventeen
        # object.__setattr__ calls: the same object, in half the time.
        state = _new_object(CacheState)
        state.__dict__.update(zip(_STATE_FIELDS, (
            self.path, self.device, self.kind, self.size, PAGE_SIZE, rng.offset,
            rng.length, rng.pages, cached, dirty, writeback, evicted, recently_evicted,
            interface, exact, reason, beyond_end)))
        return state

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
            # The kernel tells each open file once and marks the pages clean:
            # record it at once (the drop lock keeps every other drop of this
            # device waiting), or the next drop would discard the only copy.
            try:
                record, problem = failures.record(self.fd, self.path, err, before.dirty), None
            except StateDirError as exc:
                record, problem = None, f"{exc.path}: {exc.message}; fix: {exc.fix}"
            except OSError as exc:
                record, problem = None, f"{exc.strerror or exc}: {exc.filename}"
            after = self.status(rng=rng, interface=interface)
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
        that device instance raise WritebackFailedBefore and drop nothing.
        An exclusive flock(2) on the device's descriptor is held from that
        lookup to the end (BusyError after failures.LOCK_TIMEOUT seconds of
        waiting for another drop), so that a concurrent drop cannot miss a
        failure the kernel reported to this one only.
        """
        rng = self.range(offset, length)
        failures.lock(self.fd, self.path)
        try:
            return self._drop_locked(rng, method, expect_clean, retries, interface,
                                     discard_failed)
        finally:
            failures.unlock(self.fd)

    def _failure_on_record(self, discard_failed):
        """(Failure or None, warning or None); WritebackFailedBefore or
        StateDirError when the drop must not go on."""
        try:
            failure = failures.lookup(self.fd)
        except StateDirError as exc:
            if not discard_failed:
                raise StateDirError(
                    f"{exc.message}; cannot tell whether a failed write-back of "
                    f"{self.path} is on record, so nothing was dropped", exc.path,
                    exc.fix) from None
            return None, f"{exc.path}: {exc.message}: no record consulted or removed"
        if failure is not None and not discard_failed:
            raise WritebackFailedBefore(
                f"{failure.describe()}: its cached pages may be the only copy of that "
                "data; nothing was dropped (save what is needed, then drop with "
                "--discard-failed)", self.path, failure)
        return failure, None

    def _forget(self, failure):
        """Remove the record a completed --discard-failed drop made obsolete;
        a warning if it cannot be removed (the drop itself succeeded)."""
        try:
            failures.clear(self.fd)
        except StateDirError as exc:
            reason = f"{exc.path}: {exc.message}"
        except OSError as exc:
            reason = f"{exc.filename}: {exc.strerror or exc}"
        else:
            return None
        return (f"the record {failure.record} could not be removed ({reason}); "
                "later drops refuse until it is (blkcache failures --clear)")

    def _drop_locked(self, rng, method, expect_clean, retries, interface, discard_failed):
        failure, record_warning = self._failure_on_record(discard_failed)
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
            record_warning = self._forget(failure)
        warning = "; ".join(w for w in (warning, record_warning) if w) or None
        return DropResult(self.path, self.device, method, attempts, before, after, warning)

    def verify(self, offset=0, length=None, interface="auto"):
        """Verification: "clean" only when the range is known to hold no page."""
        state = self.status(offset, length, interface)
        verdict = {True: "clean", False: "resident", None: "unknown"}[state.clean]
        return Verification(verdict, state)


#: At most this many devices in one call of open_targets() (and the CLI).
MAX_TARGETS = 256


def open_targets(paths, stack, offset=0, length=None):
    """Open every path (at most MAX_TARGETS) into ``stack``, an ExitStack.

    All are opened and type-checked, and the range (``offset``, ``length``)
    is validated on each, before any is used: bad input on any device (a
    path, a type, a range past its end) stops a multi-device call before
    anything changes.
    """
    paths = list(paths)
    if len(paths) > MAX_TARGETS:
        raise UsageError(f"too many devices: {len(paths)} (at most {MAX_TARGETS})")
    targets = [stack.enter_context(Target(path)) for path in paths]
    for target in targets:
        target.range(offset, length)
    return targets


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
