"""Related block devices: partitions and the devices below (stacked devices).

Each partition and each stacked device (dm, md, multipath) has a page cache
of its own, not kept coherent with the disk under it: a write through a
partition leaves stale pages in the whole disk's cache.  expand() turns one
device into the list of devices whose caches matter:

- the device itself;
- its partitions (/sys/class/block/X/X1 ...);
- the devices below it: for a partition, its whole disk; for a stacked
  device, its slaves (/sys/class/block/X/slaves), recursively.

Walks are cycle-safe (each MAJ:MIN once) and bounded in depth.  A sysfs
entry without a device node in /dev is reported with path None (``missing``)
rather than skipped silently.
"""

import os
import stat
from dataclasses import dataclass
from typing import Optional

from .sysfs import SYSFS, dev_path, listdir, name_of, rdev_of

MAX_DEPTH = 16
RELATIONS = ("self", "partition", "disk", "slave")


@dataclass(frozen=True)
class Related:
    """One device related to the one asked about."""

    path: Optional[str]      # device node, None when /dev has none
    name: str                # sysfs name (loop0p1, dm-0 ...)
    rdev: Optional[str]      # "MAJ:MIN"
    relation: str            # self, partition, disk, slave
    parent: Optional[str]    # sysfs name of the device it relates to
    depth: int

    @property
    def missing(self):
        return self.path is None

    def to_dict(self):
        return {"path": self.path, "name": self.name, "rdev": self.rdev,
                "relation": self.relation, "parent": self.parent, "depth": self.depth}


def _partitions(name, sysfs):
    base = f"{sysfs}/class/block/{name}"
    return [entry for entry in listdir(base)
            if os.path.exists(f"{base}/{entry}/partition")]


def _whole_disk(name, sysfs):
    """For a partition, the name of its disk; else None."""
    base = f"{sysfs}/class/block/{name}"
    if not os.path.exists(f"{base}/partition"):
        return None
    parent = os.path.basename(os.path.dirname(os.path.realpath(base)))
    return parent if os.path.exists(f"{sysfs}/class/block/{parent}/dev") else None


def expand(path, sysfs=SYSFS, partitions=True, below=True):
    """Related devices of ``path``, itself first; a list of Related.

    ``path`` must be a block device (anything else is returned alone, as
    "self").  Order: the device, then breadth first its partitions, its
    disk (for a partition) and its slaves.
    """
    try:
        st = os.stat(path)
    except OSError:
        return [Related(path, os.path.basename(path), None, "self", None, 0)]
    if not stat.S_ISBLK(st.st_mode):
        return [Related(path, os.path.basename(path), None, "self", None, 0)]
    rdev = st.st_rdev
    name = name_of(rdev, sysfs)
    majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    out = [Related(path, name or os.path.basename(path), majmin, "self", None, 0)]
    if name is None:
        return out
    seen = {rdev}
    queue = [(name, 0)]
    while queue:
        current, depth = queue.pop(0)
        if depth >= MAX_DEPTH:
            continue
        found = []
        if partitions and depth == 0:
            found += [(p, "partition") for p in _partitions(current, sysfs)]
        if below:
            disk = _whole_disk(current, sysfs)
            if disk:
                found.append((disk, "disk"))
            found += [(s, "slave") for s in listdir(f"{sysfs}/class/block/{current}/slaves")]
        for child, relation in found:
            child_rdev = rdev_of(child, sysfs)
            if child_rdev is None or child_rdev in seen:
                continue   # gone meanwhile, or seen already (cycle, diamond)
            seen.add(child_rdev)
            out.append(Related(dev_path(child, child_rdev), child,
                               f"{os.major(child_rdev)}:{os.minor(child_rdev)}",
                               relation, current, depth + 1))
            if relation != "partition":
                queue.append((child, depth + 1))
    return out


def expand_all(paths, sysfs=SYSFS):
    """expand() each path; each device once (the first mention wins)."""
    out, seen = [], set()
    for path in paths:
        for rel in expand(path, sysfs):
            key = rel.rdev or ("path", rel.path)
            if key in seen:
                continue
            seen.add(key)
            out.append(rel)
    return out


__all__ = ["Related", "expand", "expand_all", "RELATIONS"]
