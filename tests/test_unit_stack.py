"""blkcache.stack and blkcache.sysfs on a hand-built sysfs tree: partitions,
disks, slaves, cycles, nodes missing from /dev, the depth bound.  Any user:
the only real thing touched is a stat(2) of one existing block device node."""

import os
import stat

import pytest

from blkcache import stack, sysfs

from needs import missing

GHOST_MAJOR = 240       # LANANA "local/experimental": no node of ours in /dev


def a_block_node():
    """(path, rdev) of some block device node in /dev, for stat(2) only."""
    for name in sorted(os.listdir("/sys/class/block")):
        path = f"/dev/{name}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            return path, st.st_rdev
    missing("no block device node in /dev")


class Tree:
    """A fake /sys: class/block/NAME/{dev,slaves/,partition} and dev/block links."""

    def __init__(self, root):
        self.root = root

    def add(self, name, rdev, slaves=(), partition_of=None):
        base = self.root / "class/block" / name
        if partition_of is not None:
            # Like sysfs: the partition's directory lives inside its disk's.
            disk = (self.root / "class/block" / partition_of).resolve()
            (disk / name).mkdir(parents=True)
            base.parent.mkdir(parents=True, exist_ok=True)
            base.symlink_to(disk / name)
            (base / "partition").write_text("1\n")
        (base / "slaves").mkdir(parents=True, exist_ok=True)
        (base / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        for slave in slaves:
            (base / "slaves" / slave).mkdir()
        link = self.root / "dev/block" / f"{os.major(rdev)}:{os.minor(rdev)}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(base)


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path)


def ghost(minor):
    return os.makedev(GHOST_MAJOR, minor)


def test_partitions_then_slaves_breadth_first_each_once(tree):
    path, rdev = a_block_node()
    top = "topdev"
    tree.add(top, rdev, slaves=["ghost1", "ghost2"])
    tree.add("topdev1", ghost(11), partition_of=top)
    tree.add("ghost1", ghost(1), slaves=[top, "ghost3"])       # a cycle back to the top
    tree.add("ghost2", ghost(2), slaves=["ghost3"])            # a diamond
    tree.add("ghost3", ghost(3))
    rels = stack.expand(path, sysfs=str(tree.root))
    assert [(r.name, r.relation, r.parent, r.depth, r.rdev) for r in rels] == [
        (top, "self", None, 0, f"{os.major(rdev)}:{os.minor(rdev)}"),
        ("topdev1", "partition", top, 1, f"{GHOST_MAJOR}:11"),
        ("ghost1", "slave", top, 1, f"{GHOST_MAJOR}:1"),
        ("ghost2", "slave", top, 1, f"{GHOST_MAJOR}:2"),
        ("ghost3", "slave", "ghost1", 2, f"{GHOST_MAJOR}:3"),
    ]
    assert rels[0].path == path and not rels[0].missing
    assert all(r.missing and r.path is None for r in rels[1:])


def test_a_partition_leads_to_its_disk_and_not_to_its_siblings(tree):
    path, rdev = a_block_node()
    tree.add("disk", ghost(20))
    tree.add("disk1", rdev, partition_of="disk")
    tree.add("disk2", ghost(22), partition_of="disk")
    rels = stack.expand(path, sysfs=str(tree.root))
    assert [(r.name, r.relation) for r in rels] == [("disk1", "self"), ("disk", "disk")]
    assert stack.expand(path, sysfs=str(tree.root), below=False)[1:] == []


def test_depth_is_bounded(tree):
    path, rdev = a_block_node()
    tree.add("top", rdev, slaves=["g0"])
    for i in range(stack.MAX_DEPTH + 5):
        tree.add(f"g{i}", ghost(100 + i), slaves=[f"g{i + 1}"])
    rels = stack.expand(path, sysfs=str(tree.root))
    assert [r.depth for r in rels] == list(range(stack.MAX_DEPTH + 1))


def test_expand_all_keeps_the_first_mention(tree):
    path, rdev = a_block_node()
    tree.add("top", rdev, slaves=["g1"])
    tree.add("g1", ghost(1))
    rels = stack.expand_all([path, path], sysfs=str(tree.root))
    assert [r.name for r in rels] == ["top", "g1"]


def test_sysfs_lookups(tree):
    tree.add("g5", ghost(5))
    (tree.root / "class/block/bad").mkdir(parents=True)
    (tree.root / "class/block/bad/dev").write_text("garbage\n")
    root = str(tree.root)
    assert sysfs.rdev_of("g5", root) == ghost(5)
    assert sysfs.rdev_of("bad", root) is None and sysfs.rdev_of("absent", root) is None
    assert sysfs.name_of(ghost(5), root) == "g5" and sysfs.name_of(ghost(6), root) is None
    assert sysfs.listdir(f"{root}/class/block") == ["bad", "g5"]
    assert sysfs.listdir(f"{root}/nowhere") == []
    assert sysfs.dev_path("g5", ghost(5)) is None


def test_a_path_that_is_no_block_device_is_itself(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(b"x")
    assert [(r.path, r.relation, r.rdev) for r in stack.expand(str(image))] == \
        [(str(image), "self", None)]
