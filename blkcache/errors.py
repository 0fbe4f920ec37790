"""The exceptions blkcache raises.

Failures the kernel reports are plain ``OSError`` subclasses (with ``errno``
and ``filename``), so callers get ``PermissionError``, ``FileNotFoundError``
and friends.  Conditions without an errno are ``BlkcacheError`` subclasses.
"""

import errno
import os


class BlkcacheError(Exception):
    """A condition blkcache refuses or cannot handle; no errno behind it."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self):
        return f"{self.path}: {self.message}" if self.path else self.message


class UnsupportedFileError(BlkcacheError):
    """The path is neither a block device nor a regular file."""


class InvalidRangeError(BlkcacheError, ValueError):
    """An offset or length that does not fit the device."""


class UsageError(BlkcacheError, ValueError):
    """Arguments that cannot work together (too many devices, bad size...)."""


class MethodUnavailableError(BlkcacheError):
    """A forced drop method cannot work here; ``fix`` says what would help."""

    def __init__(self, message, path=None, fix=None):
        super().__init__(message, path)
        self.fix = fix


class MissingDependencyError(BlkcacheError):
    """An optional feature needs a Python package that is not installed
    (a setup.py extra); ``fix`` says how to get it."""

    def __init__(self, message, path=None, fix=None):
        super().__init__(message, path)
        self.fix = fix


class DirtyPagesError(BlkcacheError):
    """``expect_clean`` found dirty or writeback pages; nothing was done."""

    def __init__(self, message, path=None, state=None):
        super().__init__(message, path)
        self.state = state


class CannotTellError(BlkcacheError):
    """A decision needs page-cache state the kernel will not report."""

    def __init__(self, message, path=None, state=None):
        super().__init__(message, path)
        self.state = state


class WritebackFailedBefore(BlkcacheError):
    """An earlier write-back of this device failed (see blkcache.failures):
    its cached pages may be the only copy of that data, so nothing was
    dropped.  ``failure`` is the record; drop(discard_failed=True) goes on."""

    def __init__(self, message, path=None, failure=None):
        super().__init__(message, path)
        self.failure = failure


class StateDirError(BlkcacheError):
    """The state directory of blkcache.failures cannot be trusted: a symbolic
    link, not a directory, owned by another user, or writable by group or
    others.  ``path`` is the directory; ``fix`` says what to do."""

    def __init__(self, message, path=None, fix=None):
        super().__init__(message, path)
        self.fix = fix


class BusyError(BlkcacheError):
    """Another process held the device's drop lock (flock) for too long;
    nothing was dropped."""


class MissingNodeError(BlkcacheError):
    """A device found by a recursive expansion (a partition, the disk, a
    sysfs slave) that has no node in /dev: it cannot be opened, so it was not
    handled.  ``related`` is the blkcache.stack.Related."""

    def __init__(self, related):
        super().__init__(f"{related.name} ({related.rdev}, {related.relation} of "
                         f"{related.parent}): no device node in /dev; not handled")
        self.related = related


class WritebackError(OSError):
    """Writing dirty pages back failed: nothing was dropped.

    ``before`` and ``after`` are the cache states around the failed sync.
    After a failed write-back the kernel may mark the pages clean, so the
    dirty count in ``before`` is the number of pages whose data is at risk.
    """

    def __init__(self, err, path, before=None, after=None, record=None, record_error=None):
        super().__init__(err, os.strerror(err), path)
        self.before = before
        self.after = after
        #: Where the failure was recorded (blkcache.failures), else None and
        #: ``record_error`` says why it could not be.
        self.record = record
        self.record_error = record_error


def from_errno(err, path):
    """An OSError subclass for errno ``err`` about ``path``."""
    return OSError(err, os.strerror(err), path)


NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG,
                              errno.ELOOP})


class HelperError(OSError):
    """The setcap helper blkcache-flush failed without an errno to report.

    An ``OSError`` (exit status 5 on the command line) whose ``errno`` is
    None; ``filename`` is the device.  When the helper reports an errno,
    a plain ``OSError`` with that errno is raised instead.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.message = message
        self.strerror = message
        self.filename = path

    def __str__(self):
        return f"{self.filename}: {self.message}" if self.filename else self.message
