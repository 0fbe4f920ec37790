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

The /proc scan (fds and maps) is native (blkcache_scan_holders: getdents64,
readlinkat, one read of each maps file, a thread per CPU up to four): with
thousands of processes it is what the time goes to.
"""

import os
from dataclasses import asdict
from typing import Optional, Tuple

from . import native
from .record import Record, record
from .sysfs import SYSFS, dev_dir, dev_path, listdir, rdev_of


@record
class ProcessHolder(Record):
    """A process holding the device: open descriptors and/or mappings."""

    pid: int
    command: str
    fds: Tuple[int, ...] = ()
    mapped: bool = False

    def __init__(self, pid, command, fds=(), mapped=False):
        self.__dict__.update(pid=pid, command=command, fds=fds, mapped=mapped)

    def describe(self):
        what = []
        if self.fds:
            what.append("fd " + ",".join(str(fd) for fd in self.fds))
        if self.mapped:
            what.append("mapped")
        return f"process {self.pid} ({self.command}) {' '.join(what)}"


@record
class MountHolder(Record):
    mount_point: str
    fstype: str
    mount_id: int

    def __init__(self, mount_point, fstype, mount_id):
        self.__dict__.update(mount_point=mount_point, fstype=fstype, mount_id=mount_id)

    def describe(self):
        return f"mount {self.mount_point} ({self.fstype})"


@record
class StackedHolder(Record):
    """A device stacked on this one (sysfs holders), e.g. dm-0."""

    name: str
    path: Optional[str]

    def __init__(self, name, path):
        self.__dict__.update(name=name, path=path)

    def describe(self):
        return f"holder {self.name}" + (f" ({self.path})" if self.path else "")


@record
class Holders(Record):
    path: str
    rdev: Optional[Tuple[int, int]]
    processes: Tuple[ProcessHolder, ...]
    mounts: Tuple[MountHolder, ...]
    stacked: Tuple[StackedHolder, ...]
    #: pids whose fds/maps could not be read (permission): the list may be short.
    unreadable: int = 0

    def __init__(self, path, rdev, processes, mounts, stacked, unreadable=0):
        self.__dict__.update(path=path, rdev=rdev, processes=processes, mounts=mounts,
                             stacked=stacked, unreadable=unreadable)

    @property
    def held(self):
        return bool(self.processes or self.mounts or self.stacked)

    def to_dict(self):
        data = asdict(self)
        data["rdev"] = None if self.rdev is None else f"{self.rdev[0]}:{self.rdev[1]}"
        for proc in data["processes"]:
            proc["fds"] = list(proc["fds"])
        return data


def _command(pid, proc):
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def process_holders(rdev, node_ids=(), proc="/proc", skip=()):
    """ProcessHolder for every process with an fd or mapping on block device rdev.

    ``node_ids``: (st_dev, st_ino) pairs of device nodes known to be this device
    (for maps, which name the node's inode).  ``skip``: at most one (pid, fd)
    pair to ignore.  Returns (holders, unreadable_pid_count).  The scan is the
    native blkcache_scan_holders (one pass over proc, a read of each maps file).
    """
    node_ids = list(node_ids)
    skip = list(skip) or [(-1, -1)]
    if len(skip) > 1:
        raise ValueError("skip: at most one (pid, fd) pair")
    records, unreadable = native.scan_holders(proc, rdev, node_ids, skip[0], proc)
    found = {}
    for pid, fd in records:
        fds, mapped = found.setdefault(pid, ([], [False]))
        if fd < 0:
            mapped[0] = True
        else:
            fds.append(fd)
    holders = tuple(ProcessHolder(pid, _command(pid, proc), tuple(fds), mapped[0])
                    for pid, (fds, mapped) in found.items())
    return holders, unreadable


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


def stacked_holders(rdev, sysfs=SYSFS):
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
