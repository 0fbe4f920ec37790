"""``blkcache install-helper``: the setcap helper as a root-owned system file.

A capability set with setcap(8) on the package's own copy of blkcache-flush
lives inside site-packages: the next ``pip install`` replaces the file and
the capability is gone, and the copy is only as safe as the venv's owner.
This installs the built helper as ``PREFIX/libexec/blkcache/blkcache-flush``
(root:root, 0755), a place blkcache.privilege searches before the package's
own copy:

1. the package's helper must be trusted (blkcache.privilege.untrusted: a
   copy in a user's venv is not), and every existing directory of the
   prefix must be root's and not writable by group or others (else refused,
   nothing changed); missing ones are created root:root 0755;
2. the helper is copied to a temporary file in the target directory,
   chowned root:root, chmod 0755, given ``cap_sys_admin+p`` (the
   ``security.capability`` attribute setcap(8) writes) and renamed over the
   target: a caller sees the old helper or the new one, never one without
   its capability.

``uninstall`` removes the helper (and its directory, when empty).  Both take
``dry_run``: the steps are returned, nothing is changed.
"""

import errno
import os
import shlex
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Tuple

from .. import privilege
from ..errors import BlkcacheError, UsageError

DEFAULT_PREFIX = "/usr/local"
SUBDIR = os.path.join("libexec", "blkcache")
MODE = 0o755

#: struct vfs_cap_data revision 2 granting cap_sys_admin permitted only, as
#: `setcap cap_sys_admin+p` writes it.
CAP_SYS_ADMIN_P = struct.pack("<IIIII", 0x02000000, 1 << privilege.CAP_SYS_ADMIN, 0, 0, 0)


class InstallError(BlkcacheError):
    """install-helper refused or failed; nothing (more) was changed."""


@dataclass(frozen=True)
class Outcome:
    """What install or uninstall did (or, with dry_run, would do)."""

    target: str
    steps: Tuple[str, ...]
    dry_run: bool
    changed: bool

    def to_dict(self):
        return {"target": self.target, "steps": list(self.steps), "dry_run": self.dry_run,
                "changed": self.changed}


def _target_dir(prefix):
    if not os.path.isabs(prefix):
        raise UsageError(f"--prefix must be an absolute path, not {prefix!r}")
    return os.path.join(os.path.realpath(prefix), SUBDIR)


def _check_prefix(prefix):
    """The directories of PREFIX/libexec/blkcache, top down, each with True when
    it exists; InstallError when an existing one is not root's or is writable
    by group or others."""
    target_dir = _target_dir(prefix)
    parts, directory = [], target_dir
    while True:
        parts.append(directory)
        if directory == "/":
            break
        directory = os.path.dirname(directory)
    dirs = []
    for directory in reversed(parts):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            dirs.append((directory, False))
            continue
        quoted = shlex.quote(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise InstallError("not a directory", directory)
        if st.st_uid != 0:
            raise InstallError(
                f"owned by uid {st.st_uid}, not root: its owner could replace the helper "
                f"(fix: chown root {quoted}, or choose another --prefix)", directory)
        if st.st_mode & 0o022:
            fix = ("choose a --prefix outside it" if st.st_mode & stat.S_ISVTX else
                   f"chmod go-w {quoted}, or choose another --prefix")
            raise InstallError(
                f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"they could replace the helper (fix: {fix})", directory)
        dirs.append((directory, True))
    return dirs


def _source():
    """The package's own helper, if nobody but root could have changed it: a
    copy from a user's venv would hand that user CAP_SYS_ADMIN."""
    source = privilege.helper_path()
    if not os.path.isfile(source):
        raise InstallError(f"no built {privilege.HELPER_NAME} to install (reinstall "
                           "blkcache with a C compiler present)", source)
    distrust = privilege.untrusted(source)
    if distrust is not None:
        raise InstallError(f"refusing to install it: {distrust[0]} (fix: install "
                           "blkcache where only root can write, e.g. as root in a "
                           "root-owned venv, and run its install-helper)", source)
    return source


def _require_root(dry_run):
    if not dry_run and os.geteuid() != 0:
        raise InstallError("install-helper needs root (it installs a root-owned file with "
                           "a file capability; try: sudo blkcache install-helper)")


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(directory):
    os.mkdir(directory, MODE)
    os.chown(directory, 0, 0)
    os.chmod(directory, MODE)       # not the umask's idea of 0755


def _copy_with_capability(source, target):
    """Copy ``source`` to ``target`` atomically, root:root 0755, cap_sys_admin+p."""
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{privilege.HELPER_NAME}.", dir=directory)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 16):
                dst.write(chunk)
            os.fchown(dst.fileno(), 0, 0)
            os.fchmod(dst.fileno(), MODE)
            os.setxattr(dst.fileno(), privilege.XATTR_CAPS, CAP_SYS_ADMIN_P)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def install(prefix=DEFAULT_PREFIX, dry_run=False):
    """Install the package's helper under ``prefix``: an Outcome, or InstallError."""
    _require_root(dry_run)
    source = _source()
    dirs = _check_prefix(prefix)
    target = os.path.join(dirs[-1][0], privilege.HELPER_NAME)
    steps = [f"create {d} (root:root 0755)" for d, exists in dirs if not exists]
    replacing = os.path.lexists(target)
    steps.append(f"install {source} as {target} (root:root 0755, cap_sys_admin+p), "
                 + ("replacing the one there atomically" if replacing else "atomically"))
    if dry_run:
        return Outcome(target, tuple(steps), True, False)
    try:
        for directory, exists in dirs:
            if not exists:
                _make_dir(directory)
        _copy_with_capability(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise InstallError(f"the file system does not store file capabilities "
                               f"({exc.strerror}); choose another --prefix",
                               os.path.dirname(target)) from None
        raise InstallError(f"{exc.strerror}: {exc.filename or target}", target) from None
    status = privilege.helper_status(target, probe=False)
    if not (status.trusted and status.cap_sys_admin):
        raise InstallError(f"installed, but not usable: {status.problem}", target)
    return Outcome(target, tuple(steps), False, True)


def uninstall(prefix=DEFAULT_PREFIX, dry_run=False):
    """Remove the helper installed under ``prefix`` (and its directory when empty)."""
    _require_root(dry_run)
    directory = _target_dir(prefix)
    target = os.path.join(directory, privilege.HELPER_NAME)
    if not os.path.lexists(target):
        return Outcome(target, (f"nothing to remove: no {target}",), dry_run, False)
    steps = [f"remove {target}"]
    others = [name for name in os.listdir(directory) if name != privilege.HELPER_NAME]
    if not others:
        steps.append(f"remove the empty directory {directory}")
    if dry_run:
        return Outcome(target, tuple(steps), True, False)
    try:
        os.unlink(target)
        if not others:
            os.rmdir(directory)
    except OSError as exc:
        raise InstallError(f"{exc.strerror}: {exc.filename or target}", target) from None
    return Outcome(target, tuple(steps), False, True)


__all__ = ["DEFAULT_PREFIX", "InstallError", "Outcome", "install", "uninstall"]
