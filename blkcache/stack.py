"""Related block devices: partitions, devices below and devices above.

Each partition and each stacked device (dm, md, multipath) has a page cache
of its own, not kept coherent with the disk under it: a write through a
partition leaves stale pages in the whole disk's cache, and a guest or a
mount reading through a dm device stacked on the disk sees that device's
cache, not the disk's.  expand() turns one device into the list of devices
whose caches matter, each with its relation:

- the device itself ("self");
- its partitions (/sys/class/block/X/X1 ...: "partition");
- the devices below it: for a partition, its whole disk ("disk"); for a
  stacked device, its slaves (/sys/class/block/X/slaves: "slave"),
  recursively downwards;
- the devices stacked above it and above its partitions
  (/sys/class/block/X/holders: "holder"), recursively upwards, with their
  partitions.

Siblings are not views of the device and are not followed: the other slaves
of a holder, the other partitions of a partition's disk.

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
RELATIONS = ("self", "partition", "disk", "slave", "holder")


@dataclass(frozen=True)
class Related:
    """One device related to the one asked about."""

    path: Optional[str]      # device node, None when /dev has none
    name: str                # sysfs name (loop0p1, dm-0 ...)
    rdev: Optional[str]      # "MAJ:MIN"
    relation: str            # self, partition, disk, slave, holder
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


# Which relations are followed from a device reached as ...: "self" looks
# every way; below only further down; above only further up (and at the
# partitions of what is above); a partition only up.
_FOLLOW = {"self": ("partition", "disk", "slave", "holder"),
           "partition": ("holder",),
           "disk": ("disk", "slave"), "slave": ("disk", "slave"),
           "holder": ("partition", "holder")}


def _neighbours(name, reached_as, sysfs, wanted):
    follow = [rel for rel in _FOLLOW[reached_as] if rel in wanted]
    base = f"{sysfs}/class/block/{name}"
    found = []
    if "partition" in follow:
        found += [(p, "partition") for p in _partitions(name, sysfs)]
    if "disk" in follow:
        disk = _whole_disk(name, sysfs)
        if disk:
            found.append((disk, "disk"))
    if "slave" in follow:
        found += [(s, "slave") for s in listdir(f"{base}/slaves")]
    if "holder" in follow:
        found += [(h, "holder") for h in listdir(f"{base}/holders")]
    return found


def expand(path, sysfs=None, partitions=True, below=True, above=True):
    """Related devices of ``path``, itself first; a list of Related.

    ``path`` must be a block device (anything else is returned alone, as
    "self").  Order: the device, then breadth first its partitions, its
    disk (for a partition), its slaves and its holders.  ``sysfs`` defaults
    to SYSFS.
    """
    sysfs = sysfs or SYSFS
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
    wanted = {"partition"} if partitions else set()
    wanted |= {"disk", "slave"} if below else set()
    wanted |= {"holder"} if above else set()
    seen = {rdev}
    queue = [(name, "self", 0)]
    while queue:
        current, reached_as, depth = queue.pop(0)
        if depth >= MAX_DEPTH:
            continue
        for child, relation in _neighbours(current, reached_as, sysfs, wanted):
            child_rdev = rdev_of(child, sysfs)
            if child_rdev is None or child_rdev in seen:
                continue   # gone meanwhile, or seen already (cycle, diamond)
            seen.add(child_rdev)
            out.append(Related(dev_path(child, child_rdev), child,
                               f"{os.major(child_rdev)}:{os.minor(child_rdev)}",
                               relation, current, depth + 1))
            queue.append((child, relation, depth + 1))
    return out


def expand_all(paths, sysfs=None):
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


def unchecked(paths, sysfs=None):
    """The related devices of ``paths`` that are not among them: what
    expand_all() would add (a list of Related, each once)."""
    expanded = [expand(path, sysfs) for path in paths]
    named = {rels[0].rdev or ("path", rels[0].path) for rels in expanded}
    out, seen = [], set(named)
    for rels in expanded:
        for rel in rels[1:]:
            if rel.rdev not in seen:
                seen.add(rel.rdev)
                out.append(rel)
    return out


__all__ = ["Related", "expand", "expand_all", "unchecked", "RELATIONS"]
