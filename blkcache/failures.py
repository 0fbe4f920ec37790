"""A record of failed write-backs, so that a second drop cannot lose data.

When write-back fails (EIO, ENOSPC), the kernel reports the error once to
each open file and marks the pages clean.  drop() stops there (exit 5), but
a second drop opens the device afresh, is told nothing, and its BLKFLSBUF
or fadvise would silently discard pages that may be the only copy of the
data.  So drop() records the failure here, keyed by the device number (or
a file's device and inode), and refuses to drop a recorded device until the
caller says the cached data may go (``discard_failed=True``, CLI
``--discard-failed``), which also clears the record.

Records live in /run/blkcache/writeback-failed (a tmpfs: a reboot has lost
the cache too), or in $BLKCACHE_STATE_DIR/writeback-failed.  Recording is
best effort: a user who cannot write there is told so in the error.
"""

import os
import stat
import time
from dataclasses import dataclass

DEFAULT_STATE_DIR = "/run/blkcache"


def state_dir():
    return os.path.join(os.environ.get("BLKCACHE_STATE_DIR") or DEFAULT_STATE_DIR,
                        "writeback-failed")


def key_of(fd):
    """A file name for the device (or file) behind fd."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return f"block-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file-{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


@dataclass(frozen=True)
class Failure:
    """A recorded failed write-back."""

    path: str
    errno: int
    dirty: object       # pages dirty before the failed sync (int or None)
    when: float         # seconds since the epoch
    record: str         # the record's file name
    problem: object = None  # why the record could not be read (str), or None

    def describe(self):
        if self.problem is not None:
            return (f"an earlier write-back of this device may have failed (record "
                    f"{self.record} cannot be read: {self.problem})")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.when))
        return (f"an earlier write-back of this device failed ({os.strerror(self.errno)}, "
                f"{'?' if self.dirty is None else self.dirty} pages were dirty, "
                f"{stamp}, via {self.path}; record {self.record})")


def record(fd, path, err, dirty):
    """Record a failed write-back; the record's path, or an OSError."""
    import json

    directory = state_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    name = os.path.join(directory, key_of(fd))
    data = {"path": os.fsencode(path).decode("utf-8", "backslashreplace"),
            "errno": err, "dirty": dirty, "when": time.time()}
    tmp = f"{name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, name)
    return name


def lookup(fd):
    """The Failure recorded for the device behind fd, or None."""
    import errno as errnos
    import json

    name = os.path.join(state_dir(), key_of(fd))
    try:
        with open(name, encoding="utf-8") as f:
            data = json.loads(f.read())
        return Failure(str(data["path"]), int(data["errno"]), data.get("dirty"),
                       float(data["when"]), name)
    except OSError as exc:
        if exc.errno in (errnos.ENOENT, errnos.ENOTDIR):
            return None
        problem = exc.strerror or str(exc)
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"damaged: {exc}"
    # A record we cannot read is still a failure we were told about.
    return Failure("?", 0, None, 0.0, name, problem)


def clear(fd):
    try:
        os.unlink(os.path.join(state_dir(), key_of(fd)))
    except FileNotFoundError:
        pass
