"""Who keeps a block device open (its page cache lives only while someone does).

Three sources, all read from /proc and /sys without privilege beyond what
the caller has (other users' /proc/PID/fd needs root or CAP_SYS_PTRACE):

- processes with a file descriptor on the device: /proc/PID/fd links whose
  target lies under /dev are stat()ed through the link and matched on
  st_rdev (targets elsewhere are not stat()ed, so that a hung network file
  system cannot hang the scan);
- processes with a mapping of the device: /proc/PID/maps lines whose
  dev:inode is the device node's, or whose path under /dev is the device;
- mounts: /proc/self/mountinfo lines whose major:minor is the device;
- stacked devices: /sys/dev/block/MAJ:MIN/holders (dm, md, bcache ...).
"""

import os
import stat
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from .sysfs import dev_dir, dev_path, listdir, rdev_of


@dataclass(frozen=True)
class ProcessHolder:
    """A process holding the device: open descriptors and/or mappings."""

    pid: int
    command: str
    fds: Tuple[int, ...] = ()
    mapped: bool = False

    def describe(self):
        what = []
        if self.fds:
            what.append("fd " + ",".join(str(fd) for fd in self.fds))
        if self.mapped:
            what.append("mapped")
        return f"process {self.pid} ({self.command}) {' '.join(what)}"


@dataclass(frozen=True)
class MountHolder:
    mount_point: str
    fstype: str
    mount_id: int

    def describe(self):
        return f"mount {self.mount_point} ({self.fstype})"


@dataclass(frozen=True)
class StackedHolder:
    """A device stacked on this one (sysfs holders), e.g. dm-0."""

    name: str
    path: Optional[str]

    def describe(self):
        return f"holder {self.name}" + (f" ({self.path})" if self.path else "")


@dataclass(frozen=True)
class Holders:
    path: str
    rdev: Optional[Tuple[int, int]]
    processes: Tuple[ProcessHolder, ...]
    mounts: Tuple[MountHolder, ...]
    stacked: Tuple[StackedHolder, ...]
    #: pids whose fds/maps could not be read (permission): the list may be short.
    unreadable: int = 0

    @property
    def held(self):
        return bool(self.processes or self.mounts or self.stacked)

    def to_dict(self):
        data = asdict(self)
        data["rdev"] = None if self.rdev is None else f"{self.rdev[0]}:{self.rdev[1]}"
        for proc in data["processes"]:
            proc["fds"] = list(proc["fds"])
        return data


def _pids(proc="/proc"):
    for name in os.listdir(proc):
        if name.isdigit():
            yield int(name)


def _command(pid, proc):
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _fds_on(pid, rdev, proc, skip):
    """Descriptors of pid open on block device rdev; raises PermissionError."""
    out = []
    base = f"{proc}/{pid}/fd"
    for name in os.listdir(base):
        fd = int(name)
        if (pid, fd) in skip:
            continue
        link = f"{base}/{name}"
        try:
            target = os.readlink(link)
            if not target.startswith("/dev/"):
                continue
            st = os.stat(link)
        except OSError:
            continue   # closed meanwhile
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            out.append(fd)
    return tuple(sorted(out))


def _mapped(pid, rdev, node_ids, proc, stat_cache):
    with open(f"{proc}/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            dev, inode, path = parts[3], int(parts[4]), parts[5].rstrip("\n")
            if inode == 0:
                continue
            major, minor = (int(x, 16) for x in dev.split(":"))
            if (os.makedev(major, minor), inode) in node_ids:
                return True
            if path.startswith("/dev/"):
                if path not in stat_cache:
                    try:
                        st = os.stat(path)
                        stat_cache[path] = st.st_rdev if stat.S_ISBLK(st.st_mode) else None
                    except OSError:
                        stat_cache[path] = None
                if stat_cache[path] == rdev:
                    return True
    return False


def process_holders(rdev, node_ids=(), proc="/proc", skip=()):
    """ProcessHolder for every process with an fd or mapping on block device rdev.

    ``node_ids``: (st_dev, st_ino) pairs of device nodes known to be this device
    (for maps, which name the node's inode).  ``skip``: (pid, fd) pairs to
    ignore.  Returns (holders, unreadable_pid_count).
    """
    holders, unreadable = [], 0
    node_ids = set(node_ids)
    stat_cache = {}
    for pid in _pids(proc):
        try:
            fds = _fds_on(pid, rdev, proc, skip)
            mapped = _mapped(pid, rdev, node_ids, proc, stat_cache)
        except PermissionError:
            unreadable += 1
            continue
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue   # exited meanwhile
        except OSError:
            continue
        if fds or mapped:
            holders.append(ProcessHolder(pid, _command(pid, proc), fds, mapped))
    return tuple(holders), unreadable


def _unescape(field):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_holders(rdev, mountinfo="/proc/self/mountinfo"):
    out = []
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or fields[2] != want:
                continue
            fstype = right.split()[0] if right.split() else "?"
            out.append(MountHolder(_unescape(fields[4]), fstype, int(fields[0])))
    return tuple(out)


def stacked_holders(rdev, sysfs="/sys"):
    return tuple(StackedHolder(name, dev_path(name, rdev_of(name, sysfs)))
                 for name in listdir(f"{dev_dir(rdev, sysfs)}/holders"))


def holders_of(target):
    """Holders of an open api.Target (its own descriptor is not listed)."""
    if target.kind != "block":
        return Holders(target.path, None, (), (), ())
    st = os.fstat(target.fd)
    rdev = st.st_rdev
    node_ids = {(st.st_dev, st.st_ino)}
    procs, unreadable = process_holders(rdev, node_ids, skip={(os.getpid(), target.fd)})
    return Holders(target.path, (os.major(rdev), os.minor(rdev)), procs,
                   mount_holders(rdev), stacked_holders(rdev), unreadable)


def holders(path):
    """Holders of the block device at ``path``."""
    from .api import Target

    with Target(path) as target:
        return holders_of(target)


__all__ = ["Holders", "ProcessHolder", "MountHolder", "StackedHolder", "holders",
           "holders_of", "process_holders", "mount_holders", "stacked_holders"]
