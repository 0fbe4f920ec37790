"""A record of failed write-backs, so that a second drop cannot lose data.

When write-back fails (EIO, ENOSPC), the kernel reports the error once to
each open file and marks the pages clean.  drop() stops there (exit 5), but
a second drop opens the device afresh, is told nothing, and its BLKFLSBUF
or fadvise would silently discard pages that may be the only copy of the
data.  So drop() records the failure here and refuses to drop that device
until the caller says the cached data may go (``discard_failed=True``, CLI
``--discard-failed``), which also clears the record.

A record belongs to one device *instance*, not to a device number (loop,
nbd, rbd and dm minors are reused all the time): ``block-MAJ:MIN-seqN``,
where N is the kernel's disk sequence number (BLKGETDISKSEQ, Linux 5.15+),
unique per attached disk for the life of the boot.  A record whose instance
is gone never blocks anything: records() calls it stale and prune() removes
it.  On a kernel without disk sequence numbers the record is
``block-MAJ:MIN`` and blocks every device with that number until cleared
(the conservative choice; doctor says so).  A regular file's record is
``file-MAJ:MIN:INODE``.

drop() holds an exclusive flock(2) on the device's descriptor from the
lookup through the sync and the drop (lock()), so two concurrent drops
cannot both miss a failure: the kernel tells only the first of them, which
records it before the second one may look.

The directory, /run/blkcache/writeback-failed (a tmpfs: a reboot has lost
the cache too) or $BLKCACHE_STATE_DIR/writeback-failed, is trusted only when
each of its two levels is a real directory (not a symbolic link) owned by
root or the caller and not writable by group or others; otherwise
StateDirError says which and how to fix it.  Both are created mode 0755
whatever the umask.  Records are created with O_EXCL|O_NOFOLLOW relative to
the directory's descriptor and renamed into place; they are read only if
they are regular files of at most MAX_RECORD bytes, opened O_NOFOLLOW and
O_NONBLOCK, so a planted symbolic link, FIFO or device node is refused at
once and never followed or written through.
"""

import errno as _errno
import fcntl
import os
import stat
import time

from .errors import BusyError, StateDirError
from .sysfs import SYSFS, read

DEFAULT_STATE_DIR = "/run/blkcache"
RECORDS = "writeback-failed"
DIR_MODE = 0o755
RECORD_MODE = 0o644
#: A record is a few hundred bytes; anything bigger was not written by blkcache.
MAX_RECORD = 64 << 10
#: How long drop() waits for another drop of the same device (seconds).
LOCK_TIMEOUT = 60.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Errors of BLKGETDISKSEQ that mean "this kernel has no disk sequence numbers".
_NO_DISKSEQ = (_errno.ENOTTY, _errno.EINVAL, _errno.ENOSYS)


def state_dir():
    """The directory that holds the records."""
    return os.path.join(base_dir(), RECORDS)


def base_dir():
    return os.environ.get("BLKCACHE_STATE_DIR") or DEFAULT_STATE_DIR


# -- keys --------------------------------------------------------------------

class Key:
    """What a record is about: a block device instance or a regular file."""

    __slots__ = ("kind", "major", "minor", "seq", "ino")

    def __init__(self, kind, major, minor, seq=None, ino=None):
        self.kind = kind            # "block" or "file"
        self.major = major
        self.minor = minor
        self.seq = seq              # disk sequence number; None: the kernel has none
        self.ino = ino              # a file's inode

    @property
    def rdev(self):
        return f"{self.major}:{self.minor}"

    @property
    def name(self):
        if self.kind == "file":
            return f"file-{self.rdev}:{self.ino}"
        return f"block-{self.rdev}" + ("" if self.seq is None else f"-seq{self.seq}")

    def names(self):
        """The record names that apply to this key: its own, and for a block
        device instance also a record without instance (an older blkcache, or
        a kernel without diskseq, wrote it; it may be about this instance)."""
        if self.kind == "block" and self.seq is not None:
            return (self.name, f"block-{self.rdev}")
        return (self.name,)

    @classmethod
    def parse(cls, name):
        """The Key of a record name, or None if it is not one."""
        kind, _, rest = name.partition("-")
        try:
            if kind == "file":
                major, minor, ino = (int(x) for x in rest.split(":"))
                return cls("file", major, minor, ino=ino)
            if kind == "block":
                rdev, _, seq = rest.partition("-seq")
                major, minor = (int(x) for x in rdev.split(":"))
                return cls("block", major, minor, int(seq) if seq else None)
        except ValueError:
            return None
        return None


def disk_seq(fd):
    """The disk sequence number of the block device behind fd, or None when
    the kernel has none (before Linux 5.15)."""
    from . import native

    try:
        return native.disk_seq(fd)
    except OSError as exc:
        if exc.errno in _NO_DISKSEQ:
            return None
        raise


def key_of(fd):
    """The Key of the device (or file) behind fd."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return Key("block", os.major(st.st_rdev), os.minor(st.st_rdev), disk_seq(fd))
    return Key("file", os.major(st.st_dev), os.minor(st.st_dev), ino=st.st_ino)


def sysfs_disk_seq(rdev, sysfs=None):
    """(exists, seq) of block device MAJ:MIN now, from sysfs: seq is None when
    the kernel does not publish one.  A partition has its disk's number."""
    base = f"{sysfs or SYSFS}/dev/block/{rdev}"
    if not os.path.exists(base):
        return False, None
    if os.path.exists(f"{base}/partition"):
        base = os.path.dirname(os.path.realpath(base))
    text = read(f"{base}/diskseq")
    return True, int(text) if text and text.isdigit() else None


def diskseq_available(sysfs=None):
    """Whether this kernel numbers disk instances (None: no disk to ask)."""
    root = f"{sysfs or SYSFS}/block"
    try:
        names = os.listdir(root)
    except OSError:
        return None
    return os.path.exists(f"{root}/{names[0]}/diskseq") if names else None


# -- the state directory -----------------------------------------------------

def _open_dir(name, shown, dir_fd=None, create=False):
    """A descriptor of directory ``name`` (relative to dir_fd), if trusted.

    None when it does not exist (or a component is not a directory) and
    ``create`` is false; with ``create``, it is made mode DIR_MODE whatever
    the umask.  StateDirError when it is a symbolic link or not ours to trust.
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
        except FileExistsError:
            return _open_dir(name, shown, dir_fd)      # made meanwhile by another
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchmod(fd, DIR_MODE)
        except OSError:
            os.close(fd)
            raise
    except NotADirectoryError:
        if not create and not os.path.islink(shown):
            return None     # no directory, so no record either
        raise _not_a_directory(shown) from None
    except OSError as exc:
        if exc.errno == _errno.ELOOP:
            raise _not_a_directory(shown) from None
        raise OSError(exc.errno, exc.strerror, shown) from None
    return _check_dir(fd, shown)


def _not_a_directory(shown):
    if os.path.islink(shown):
        return StateDirError(
            "state directory is a symbolic link: not trusted", shown,
            fix=f"remove the link (rm {_quote(shown)}); blkcache creates the directory")
    return StateDirError("state directory is not a directory", shown,
                         fix=f"remove it (rm {_quote(shown)}) or set BLKCACHE_STATE_DIR")


def _check_dir(fd, shown):
    st = os.fstat(fd)
    uid = os.geteuid()
    problem = fix = None
    if st.st_uid not in (0, uid):
        problem = f"owned by uid {st.st_uid}, not by root or this user (uid {uid})"
        fix = f"remove it (rm -r {_quote(shown)}) or chown it to root"
    elif st.st_mode & 0o022:
        problem = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        fix = f"chmod go-w {_quote(shown)}"
    if problem is None:
        return fd
    os.close(fd)
    raise StateDirError(f"state directory not trusted: {problem}", shown, fix=fix)


def _quote(path):
    import shlex

    return shlex.quote(path)


class _Records:
    """The records directory, opened (or None when it does not exist)."""

    def __init__(self, create=False):
        self.path = state_dir()
        self.fd = None
        base = base_dir()
        base_fd = _open_dir(base, base, create=create)
        if base_fd is None:
            return
        try:
            self.fd = _open_dir(RECORDS, self.path, dir_fd=base_fd, create=create)
        finally:
            os.close(base_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def shown(self, name):
        return os.path.join(self.path, name)

    def read(self, name):
        """The text of record ``name``; None if there is none; ValueError
        (a reason) if it is not a record we may read."""
        if self.fd is None:
            return None
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        try:
            _check_record(os.fstat(pfd))
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        finally:
            os.close(pfd)
        try:
            st = os.fstat(fd)
            _check_record(st)
            data = b""
            while len(data) <= MAX_RECORD:
                chunk = os.read(fd, MAX_RECORD + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            if len(data) > MAX_RECORD:
                raise ValueError(f"larger than {MAX_RECORD} bytes")
            return data.decode("utf-8")
        finally:
            os.close(fd)

    def write(self, name, text):
        tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, _CREATE_FLAGS, RECORD_MODE, dir_fd=self.fd)
        try:
            try:
                os.fchmod(fd, RECORD_MODE)
                data = text.encode("utf-8")
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            # rename(2) replaces the entry itself: a planted symbolic link is
            # replaced, never written through.
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise

    def remove(self, name):
        """Unlink record ``name``; whether there was one."""
        if self.fd is None:
            return False
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.shown(name)) from None
        return True

    def names(self):
        if self.fd is None:
            return []
        return sorted(name for name in os.listdir(self.fd)
                      if not name.startswith(".") and Key.parse(name) is not None)


def _check_record(st):
    if stat.S_ISLNK(st.st_mode):
        raise ValueError("a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        from .safeopen import kind_name

        raise ValueError(f"not a regular file ({kind_name(st.st_mode)})")
    if st.st_size > MAX_RECORD:
        raise ValueError(f"larger than {MAX_RECORD} bytes ({st.st_size})")


# -- records -----------------------------------------------------------------

class Failure:
    """A recorded failed write-back (a plain class: a dataclass would cost
    every drop a millisecond of start-up for a record that rarely exists)."""

    __slots__ = ("path", "errno", "dirty", "when", "record", "problem", "key", "state")

    def __init__(self, path, errno, dirty, when, record, problem=None, key=None,
                 state=None):
        self.path = path            # the path the failed drop was given
        self.errno = errno
        self.dirty = dirty          # pages dirty before the failed sync, or None
        self.when = when            # seconds since the epoch
        self.record = record        # the record's file name
        self.problem = problem      # why the record could not be read, or None
        self.key = key              # the Key its name says
        #: "live" (the instance exists: drops of it refuse), "stale" (it is
        #: gone: blocks nothing), "unknown" (cannot tell: it blocks), or None
        #: where not asked (lookup).
        self.state = state

    def describe(self):
        if self.problem is not None:
            return (f"an earlier write-back of this device may have failed (record "
                    f"{self.record} cannot be read: {self.problem})")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.when))
        scope = ""
        if self.key is not None and self.key.kind == "block" and self.key.seq is None:
            scope = (f"; recorded without a disk sequence number, so it may be about "
                     f"another device that had the number {self.key.rdev}")
        return (f"an earlier write-back of this device failed ({os.strerror(self.errno)}, "
                f"{'?' if self.dirty is None else self.dirty} pages were dirty, "
                f"{stamp}, via {self.path}; record {self.record}{scope})")

    def to_dict(self):
        key = self.key
        return {"record": self.record, "path": self.path,
                "kind": key.kind if key else None, "rdev": key.rdev if key else None,
                "diskseq": key.seq if key else None, "inode": key.ino if key else None,
                "errno": self.errno,
                "error": os.strerror(self.errno) if self.errno else None,
                "dirty": self.dirty, "when": self.when, "state": self.state,
                "problem": self.problem}


def _parse(text, record, key):
    import json

    try:
        data = json.loads(text)
        return Failure(str(data["path"]), int(data["errno"]), data.get("dirty"),
                       float(data["when"]), record, key=key)
    except (ValueError, KeyError, TypeError) as exc:
        # A record we cannot read is still a failure we were told about.
        return Failure("?", 0, None, 0.0, record, f"damaged: {exc}", key=key)


def _load(records, name, key):
    shown = records.shown(name)
    try:
        text = records.read(name)
    except ValueError as exc:
        return Failure("?", 0, None, 0.0, shown, str(exc), key=key)
    except OSError as exc:
        return Failure("?", 0, None, 0.0, shown, exc.strerror or str(exc), key=key)
    return None if text is None else _parse(text, shown, key)


def lock(fd, path, timeout=None):
    """Take an exclusive flock(2) on fd, waiting at most ``timeout`` seconds
    (LOCK_TIMEOUT) for another drop of the same device; BusyError after."""
    deadline = time.monotonic() + (LOCK_TIMEOUT if timeout is None else timeout)
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now >= deadline:
            raise BusyError(
                "another process has held this device's drop lock (flock) for "
                f"{LOCK_TIMEOUT if timeout is None else timeout:g} s; nothing was dropped",
                path)
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.1)


def unlock(fd):
    fcntl.flock(fd, fcntl.LOCK_UN)


def lookup(fd):
    """The Failure recorded for the device (instance) behind fd, or None.

    StateDirError when the state directory cannot be trusted (then nobody
    can tell whether a failure is on record).
    """
    key = key_of(fd)
    try:
        records = _Records()
    except OSError as exc:
        # Cannot look (permission...): not "no failure".
        return Failure("?", 0, None, 0.0, exc.filename or state_dir(),
                       exc.strerror or str(exc), key=key)
    with records:
        if records.fd is None:
            return None             # the common case: cheap, and json not imported
        for name in key.names():
            failure = _load(records, name, Key.parse(name))
            if failure is not None:
                return failure
    return None


def record(fd, path, err, dirty):
    """Record a failed write-back; the record's path, or an OSError
    (StateDirError when the directory cannot be trusted)."""
    import json

    key = key_of(fd)
    data = {"path": os.fsencode(path).decode("utf-8", "backslashreplace"),
            "errno": err, "dirty": dirty, "when": time.time(),
            "rdev": key.rdev, "diskseq": key.seq, "inode": key.ino}
    with _Records(create=True) as records:
        records.write(key.name, json.dumps(data))
        return records.shown(key.name)


def clear(fd):
    """Remove the records of the device (instance) behind fd; their paths."""
    key = key_of(fd)
    with _Records() as records:
        return [records.shown(name) for name in key.names() if records.remove(name)]


def clear_paths(paths):
    """Forget the failures on record for each path's device instance (and a
    record of its number without instance); the Failures removed.  Every
    path is opened first, so bad input removes nothing; each device's drop
    lock is held while its records go."""
    if not paths:
        return []
    import contextlib

    from . import api

    removed = []
    with contextlib.ExitStack() as stack:
        targets = api.open_targets(paths, stack)
        with _Records() as recs:
            for target in targets:
                lock(target.fd, target.path)
                for name in key_of(target.fd).names():
                    failure = _load(recs, name, Key.parse(name))
                    if failure is not None and recs.remove(name):
                        failure.state = "cleared"
                        removed.append(failure)
    return removed


def state_of(key, failure=None, sysfs=None):
    """"live", "stale" or "unknown" for a record's key (see Failure.state)."""
    if key.kind == "file":
        path = failure.path if failure is not None else None
        try:
            st = os.stat(path) if path and path != "?" else None
        except OSError:
            st = None
        if st is not None and (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == \
                (key.major, key.minor, key.ino):
            return "live"
        return "unknown"
    exists, seq = sysfs_disk_seq(key.rdev, sysfs)
    if not exists:
        return "stale"          # no device with that number: its cache is gone
    if key.seq is None or seq is None:
        return "unknown"        # no instance to compare: it blocks MAJ:MIN
    return "live" if seq == key.seq else "stale"


def records(sysfs=None):
    """Every Failure on record, each with its state; [] when there is none."""
    out = []
    with _Records() as recs:
        for name in recs.names():
            key = Key.parse(name)
            failure = _load(recs, name, key)
            if failure is None:
                continue        # removed meanwhile
            failure.state = state_of(key, failure, sysfs)
            out.append(failure)
    return out


def prune(sysfs=None):
    """Remove the stale records (their instance is gone); the Failures removed."""
    removed = []
    with _Records() as recs:
        for failure in records(sysfs):
            if failure.state == "stale" and recs.remove(os.path.basename(failure.record)):
                removed.append(failure)
    return removed


__all__ = ["Failure", "Key", "lookup", "record", "clear", "clear_paths", "records",
           "prune", "lock", "unlock", "key_of", "disk_seq", "state_dir", "diskseq_available",
           "MAX_RECORD", "LOCK_TIMEOUT"]
