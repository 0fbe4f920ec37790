"""Open a path only if it is a block device or a regular file.

Opening a file is not free of effects: opening /dev/watchdog arms the
watchdog (closing it without the magic character may reboot the host), a
tape device rewinds on close, a serial port raises DTR (resetting what hangs
on it), and opening the read end of a FIFO releases a writer blocked in
open(2) and then breaks its pipe.  So the type is checked before any real
open: the path is opened with O_PATH (which opens nothing behind it),
fstat'ed, and only a block device or regular file is then reopened for
reading through /proc/self/fd: the same inode, no second path lookup, no
race.  Without /proc, the path is opened again and must be the same inode.
"""

import errno
import os
import stat

from .errors import UnsupportedFileError, from_errno

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def kind_name(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _check(st, path):
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UnsupportedFileError(
            f"not a block device or regular file ({kind_name(st.st_mode)})", path)


def open_checked(path, flags):
    """An fd of ``path`` opened with ``flags``; UnsupportedFileError, without
    opening it, when it is not a block device or regular file."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise from_errno(exc.errno, path) from None
    try:
        st = os.fstat(pfd)
        _check(st, path)
        try:
            return os.open(f"/proc/self/fd/{pfd}", flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT or os.path.isdir("/proc/self/fd"):
                raise from_errno(exc.errno, path) from None
        # No /proc: open the path again, and make sure it is the same file.
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise from_errno(exc.errno, path) from None
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise from_errno(errno.ESTALE, path)
        return fd
    finally:
        os.close(pfd)
