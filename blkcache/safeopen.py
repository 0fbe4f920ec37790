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


def _reopen(pfd, path, flags, st):
    """Open what the O_PATH fd pfd refers to, for real, through /proc."""
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


def open_checked(path, flags):
    """An fd of ``path`` opened with ``flags``; UnsupportedFileError, without
    opening it, when it is not a block device or regular file."""
    return open_target(path, flags)[0]


def _dev_is_a_directory():
    """Whether /dev is a directory, not a symlink (asked once)."""
    global _dev_checked
    if _dev_checked is None:
        try:
            _dev_checked = stat.S_ISDIR(os.lstat("/dev").st_mode)
        except OSError:
            _dev_checked = False
    return _dev_checked


_dev_checked = None


def open_target(path, flags):
    """(fd, stat of it, canonical path) of ``path`` opened with ``flags``;
    UnsupportedFileError, without opening it, when it is not a block device
    or regular file.

    The canonical path is os.path.realpath(path), found without a syscall
    for a node directly in /dev that is not a symlink (/dev/loop0, the
    common case), else read back from /proc/self/fd.
    """
    simple = path.startswith("/dev/") and "/" not in path[5:] and \
        path[5:] not in ("", ".", "..") and _dev_is_a_directory()
    pfd = _open_path(path, os.O_NOFOLLOW if simple else 0)
    try:
        st = os.fstat(pfd)
        if simple and stat.S_ISLNK(st.st_mode):     # /dev/cdrom -> sr0: follow it
            simple = False
            os.close(pfd)
            pfd = -1
            pfd = _open_path(path, 0)
            st = os.fstat(pfd)
        _check(st, path)
        fd = _reopen(pfd, path, flags, st)
    finally:
        if pfd >= 0:
            os.close(pfd)
    return fd, st, path if simple else _canonical(path, fd)


def _open_path(path, extra):
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC | extra)
    except OSError as exc:
        raise from_errno(exc.errno, path) from None


def _canonical(path, fd):
    """realpath(path), read back from /proc/self/fd/FD: one syscall, where
    os.path.realpath costs one per path component (its fallback, without
    /proc or for a deleted file)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if link.startswith("/") and not link.endswith(" (deleted)"):
        return link
    return os.path.realpath(path)
