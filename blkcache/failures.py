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


class Failure:
    """A recorded failed write-back (a plain class: a dataclass would cost
    every drop a millisecond of start-up for a record that rarely exists)."""

    __slots__ = ("path", "errno", "dirty", "when", "record", "problem")

    def __init__(self, path, errno, dirty, when, record, problem=None):
        self.path = path            # the path the failed drop was given
        self.errno = errno
        self.dirty = dirty          # pages dirty before the failed sync, or None
        self.when = when            # seconds since the epoch
        self.record = record        # the record's file name
        self.problem = problem      # why the record could not be read, or None

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
    name = os.path.join(state_dir(), key_of(fd))
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None             # the common case: cheap, and json not imported
    except OSError as exc:
        return Failure("?", 0, None, 0.0, name, exc.strerror or str(exc))
    import json

    try:
        data = json.loads(text)
        return Failure(str(data["path"]), int(data["errno"]), data.get("dirty"),
                       float(data["when"]), name)
    except (ValueError, KeyError, TypeError) as exc:
        # A record we cannot read is still a failure we were told about.
        return Failure("?", 0, None, 0.0, name, f"damaged: {exc}")


def clear(fd):
    try:
        os.unlink(os.path.join(state_dir(), key_of(fd)))
    except FileNotFoundError:
        pass
