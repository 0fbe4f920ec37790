"""An open block device or regular file: the one fd every operation uses.

Opened read-only, non-blocking, close on exec, no controlling tty, and only
after its type was checked (blkcache.safeopen).  The work is done elsewhere: ranges
(blkcache.ranges), status (blkcache.residency), drop (blkcache.dropping).
"""

import errno
import os
import stat

from . import dropping, native, ranges, residency, safeopen
from .constants import DEFAULT_RETRIES
from .results import Verification

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


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
        self.fd, st, self.device = safeopen.open_target(path, OPEN_FLAGS)
        try:
            if stat.S_ISBLK(st.st_mode):
                self.kind = "block"
                self.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                self.size = native.device_size(self.fd, path)
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

    def range(self, offset=0, length=None):
        """Validate offset/length (ints or size strings) and widen to pages."""
        return ranges.page_range(self.size, offset, length, self.path)

    def status(self, offset=0, length=None, interface="auto", rng=None):
        """CacheState of the range; unknown (exact False) when the kernel won't tell.

        A range that reaches the end of the device also counts the pages
        cached past that end (``beyond_end``; cachestat(2) only).
        """
        if rng is None:
            rng = self.range(offset, length)
        return residency.status(self, rng, interface)

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
        return dropping.drop(self, self.range(offset, length), method, expect_clean,
                             retries, interface, discard_failed)

    def verify(self, offset=0, length=None, interface="auto", rng=None):
        """Verification: "clean" only when the range is known to hold no page."""
        state = self.status(offset, length, interface, rng)
        verdict = {True: "clean", False: "resident", None: "unknown"}[state.clean]
        return Verification(verdict, state)
