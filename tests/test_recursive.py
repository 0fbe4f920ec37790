"""--recursive: partitions and devices below, each its own row; stale disk pages."""

import ctypes
import fcntl
import json
import os
import struct
import time

import pytest

from blkcache import stack

import cliproc
import kernel
from units import PAGE, MiB

SECTOR = 512
# Two partitions: 1 MiB + 16 MiB, 17 MiB + 8 MiB, on a 32 MiB disk.
PARTS = [(1 * MiB, 16 * MiB), (17 * MiB, 8 * MiB)]


def write_mbr(image, parts):
    """An MS-DOS partition table, written by hand (no sfdisk needed)."""
    mbr = bytearray(512)
    struct.pack_into("<I", mbr, 440, 0x0B1C0C4E)       # disk signature
    for i, (start, size) in enumerate(parts):
        entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                            start // SECTOR, size // SECTOR)
        mbr[446 + 16 * i:446 + 16 * (i + 1)] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(image, "r+b") as f:
        f.write(mbr)


def wait_for(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong),
                ("pno", ctypes.c_int), ("devname", ctypes.c_char * 64),
                ("volname", ctypes.c_char * 64)]


class _BlkpgArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int),
                ("data", ctypes.c_void_p)]


BLKPG = 0x1269
BLKPG_ADD_PARTITION = 1


def add_partitions(disk, parts):
    """BLKPG_ADD_PARTITION, for kernels built without the MS-DOS label parser
    (partscan then finds nothing; the table is still on the image)."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for pno, (start, size) in enumerate(parts, 1):
            part = _BlkpgPartition(start, size, pno, b"", b"")
            arg = _BlkpgArg(BLKPG_ADD_PARTITION, 0, ctypes.sizeof(part),
                            ctypes.cast(ctypes.pointer(part), ctypes.c_void_p))
            fcntl.ioctl(fd, BLKPG, arg)
    finally:
        os.close(fd)


@pytest.fixture
def partitioned(loops):
    """A loop device with two partitions: (disk, part1, part2)."""
    image = loops.image(32 * MiB)
    write_mbr(image, PARTS)
    disk = loops.attach(image, partscan=True)
    parts = [f"{disk}p1", f"{disk}p2"]
    if not wait_for(parts[0], 0.2):
        add_partitions(disk, PARTS)
    for part in parts:
        assert wait_for(part, 10), f"{part} did not appear"
    return disk, parts[0], parts[1]


def test_expand_disk_and_partition(partitioned):
    disk, p1, p2 = partitioned
    name = os.path.basename(disk)
    rels = stack.expand(disk)
    assert [(r.path, r.relation, r.parent) for r in rels] == [
        (disk, "self", None), (p1, "partition", name), (p2, "partition", name)]
    rels = stack.expand(p1)
    assert [(r.path, r.relation) for r in rels] == [(p1, "self"), (disk, "disk")]
    # Each device once, even when named twice or via its partition.
    assert [r.path for r in stack.expand_all([p1, disk, p2])] == [p1, disk, p2]


def test_status_and_drop_recursive(partitioned, loops):
    disk, p1, p2 = partitioned
    fds = {dev: loops.hold(dev) for dev in (disk, p1, p2)}
    for dev, length in ((disk, 256 * 1024), (p1, 512 * 1024), (p2, 128 * 1024)):
        os.posix_fadvise(fds[dev], 0, 0, os.POSIX_FADV_RANDOM)
        kernel.fill(fds[dev], 0, length)
    before = {dev: kernel.count(fd, stress=1) for dev, fd in fds.items()}
    out = cliproc.completed("status", "--recursive", "-n", "-b", disk)
    after = {dev: kernel.cachestat(fd)["nr_cache"] for dev, fd in fds.items()}
    assert (out.returncode, out.stderr) == (0, "")
    rows = [line.split() for line in out.stdout.splitlines()]
    # Every row, the disk's too: each device once, its count the kernel's.
    assert [row[-1] for row in rows] == [disk, p1, p2]
    for row in rows:
        kernel.between(before[row[-1]], int(row[1]), after[row[-1]], row[-1])
    # Without --recursive: the disk only, and a line naming what was left out.
    out = cliproc.completed("status", "-n", disk)
    name = os.path.basename(disk)
    assert (out.returncode, len(out.stdout.splitlines())) == (0, 1)
    assert out.stderr == (f"blkcache: 2 related devices not checked ({name}p1: partition of "
                          f"{name}, {name}p2: partition of {name}); use -r\n")
    before = {dev: kernel.cachestat(fd)["nr_cache"] for dev, fd in fds.items()}
    out = cliproc.completed("drop", "--recursive", "--json", disk)
    assert (out.returncode, out.stderr) == (0, "")
    results = json.loads(out.stdout)["devices"]
    assert [r["path"] for r in results] == [disk, p1, p2]
    for r in results:
        kernel.reported_before_drop(before[r["path"]], r["before"]["cached"], r["path"])
        assert r["after"]["cached"] == 0
    assert {dev: kernel.cachestat(fd)["nr_cache"] for dev, fd in fds.items()} == \
        {disk: 0, p1: 0, p2: 0}


def test_write_through_partition_leaves_stale_disk_pages(partitioned, loops):
    disk, p1, _ = partitioned
    disk_fd = loops.hold(disk)
    os.posix_fadvise(disk_fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(disk_fd, 1 * MiB, 16 * PAGE)     # the start of p1, via the disk
    p1_fd = loops.hold(p1, os.O_RDWR)
    os.pwrite(p1_fd, b"part" * (PAGE // 4), 2 * PAGE)
    os.fsync(p1_fd)
    stale_at = 1 * MiB + 2 * PAGE
    assert kernel.read_buffered(disk_fd, stale_at, 4) == bytes(4)   # stale, really
    out = cliproc.completed("verify", "--coherence", "--recursive", "--json", p1)
    # Reclaim may have taken the stale page since: then nothing is stale.
    still = kernel.cached_pages(disk, stale_at, PAGE)
    assert (out.returncode, out.stderr) == (1 if still else 0, "")
    reports = {r["path"]: r for r in json.loads(out.stdout)["devices"]}
    assert list(reports) == [p1, disk]
    assert reports[p1]["verdict"] == "coherent"
    assert reports[disk]["stale_ranges"] in ([[stale_at, PAGE]], [])
    if still:
        assert reports[disk]["stale_ranges"] == [[stale_at, PAGE]]
        assert reports[disk]["verdict"] == "stale"
    out = cliproc.completed("drop", "--recursive", "-q", p1)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert kernel.cachestat(disk_fd)["nr_cache"] == 0
    assert kernel.read_buffered(disk_fd, stale_at, 4) == b"part"
    # The read above cached a page of the disk again: the disk's row says so.
    before, out, after = kernel.around(disk_fd, lambda: cliproc.completed("verify", "--recursive",
                                                                     p1), stress=0)
    p1_row, disk_row = out.stdout.splitlines()
    assert p1_row == f"{p1}: clean: 0 of 4096 pages (0B) cached"
    label = f"{disk} (disk of {os.path.basename(p1)}): "
    assert disk_row.startswith(label), disk_row
    pages = int(disk_row[len(label):].split()[1])
    kernel.between(before, pages, after, disk)
    verdict = "resident" if pages else "clean"
    assert disk_row.startswith(f"{label}{verdict}: {pages} of 8192 pages ("), disk_row
    assert (out.returncode, out.stderr) == (1 if pages else 0, "")


def test_cycles_and_missing_nodes(loops, tmp_path):
    """A sysfs tree with a slave cycle and a slave without a /dev node."""
    top, below = loops.attach(size=4 * MiB), loops.attach(size=4 * MiB)
    sysfs = tmp_path
    ghost_rdev = os.makedev(240, 77)
    assert stack.dev_path("ghost0", ghost_rdev) is None

    def node(name, rdev, slaves=()):
        base = sysfs / "class/block" / name
        (base / "slaves").mkdir(parents=True)
        (base / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        for slave in slaves:
            (base / "slaves" / slave).mkdir()
        link = sysfs / "dev/block" / f"{os.major(rdev)}:{os.minor(rdev)}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(base)

    top_name, below_name = os.path.basename(top), os.path.basename(below)
    node(top_name, os.stat(top).st_rdev, [below_name, "ghost0", "vanished9"])
    node(below_name, os.stat(below).st_rdev, [top_name])      # a cycle
    node("ghost0", ghost_rdev, [below_name])
    rels = stack.expand(top, sysfs=str(sysfs))
    assert [(r.path, r.name, r.relation, r.parent) for r in rels] == [
        (top, top_name, "self", None),
        (None, "ghost0", "slave", top_name),      # sysfs order: sorted names
        (below, below_name, "slave", top_name),
    ]
    assert rels[1].missing and rels[1].rdev == "240:77"
    assert not rels[2].missing


def test_non_block_paths_pass_through(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x")
    assert [(r.path, r.relation) for r in stack.expand(str(path))] == [(str(path), "self")]
    missing = str(tmp_path / "missing")
    assert [r.path for r in stack.expand(missing)] == [missing]


# -- issue 10, point 6: holders above, and what was not checked -------------------------

def blkcache_on(sysfs, *args):
    """The blkcache command reading a hand-built sysfs tree instead of /sys."""
    return cliproc.completed(*args, sysfs=sysfs)


@pytest.fixture
def stacked(loops, tmp_path):
    """Five real loop devices stacked in a hand-built sysfs tree (no
    device-mapper here): B holds A and D (a dm device over two disks), C holds
    B, E is a partition of B, and C also claims A as a holder (a cycle)."""
    devs = {key: loops.attach(size=8 * MiB) for key in "ABCDE"}
    names = {key: os.path.basename(dev) for key, dev in devs.items()}
    sysfs = tmp_path / "sysfs"

    def node(key, slaves=(), holders=(), partitions=()):
        base = sysfs / "class/block" / names[key]
        base.mkdir(parents=True, exist_ok=True)
        rdev = os.stat(devs[key]).st_rdev
        (base / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        for sub, keys in (("slaves", slaves), ("holders", holders)):
            (base / sub).mkdir(exist_ok=True)
            for other in keys:
                (base / sub / names[other]).mkdir()
        for other in partitions:
            (base / names[other]).mkdir()
            (base / names[other] / "partition").write_text("1\n")
        link = sysfs / "dev/block" / f"{os.major(rdev)}:{os.minor(rdev)}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(base)

    node("A", holders="BC")
    node("B", slaves="AD", holders="C", partitions="E")
    node("C", slaves="B", holders="A")
    node("D", holders="B")
    node("E")
    return devs, names, sysfs


def _in_sysfs_order(names, keys):
    """Keys in the order sysfs lists their names (sorted as strings)."""
    return sorted(keys, key=names.__getitem__)


def test_expand_follows_holders_up_but_not_siblings(stacked):
    devs, names, sysfs = stacked
    rels = stack.expand(devs["A"], sysfs=str(sysfs))
    assert [(r.path, r.relation, r.parent) for r in rels] == [
        (devs["A"], "self", None),
        *[(devs[k], "holder", names["A"]) for k in _in_sysfs_order(names, "BC")],
        (devs["E"], "partition", names["B"]),
    ]
    # From the dm device: its partition, both slaves below, its holder above.
    rels = stack.expand(devs["B"], sysfs=str(sysfs))
    assert [(r.path, r.relation) for r in rels] == [
        (devs["B"], "self"), (devs["E"], "partition"),
        *[(devs[k], "slave") for k in _in_sysfs_order(names, "AD")],
        (devs["C"], "holder")]
    assert [r.path for r in stack.expand(devs["A"], sysfs=str(sysfs), above=False)] == \
        [devs["A"]]
    assert sorted(r.path for r in stack.unchecked([devs["A"], devs["C"]],
                                                  sysfs=str(sysfs))) == \
        sorted([devs["B"], devs["E"], devs["D"]])     # D: below C, through B


def test_recursive_drop_reaches_the_devices_stacked_above(stacked, loops):
    devs, names, sysfs = stacked
    fds = {}
    for key in "ABCE":
        fds[key] = loops.hold(devs[key])
        os.posix_fadvise(fds[key], 0, 0, os.POSIX_FADV_RANDOM)
        kernel.read_buffered(fds[key], 0, 2 * MiB)
    out = blkcache_on(sysfs, "status", "-r", "-n", devs["A"])
    assert out.returncode == 0, out.stderr
    holders = _in_sysfs_order(names, "BC")
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [(row[-2], row[-1]) for row in rows] == [
        ("self", devs["A"]), *[(f"holder:{names['A']}", devs[k]) for k in holders],
        (f"partition:{names['B']}", devs["E"])]
    out = blkcache_on(sysfs, "status", "-r", "-J", devs["A"])
    data = json.loads(out.stdout)
    assert [(d["path"], d["relation"], d["parent"]) for d in data["devices"]] == [
        (devs["A"], "self", None), *[(devs[k], "holder", names["A"]) for k in holders],
        (devs["E"], "partition", names["B"])]
    assert data["not_checked"] == []

    # Without -r: one line says what was left, and JSON lists it.
    out = blkcache_on(sysfs, "verify", devs["A"])
    assert out.returncode == 1
    assert out.stderr == (
        "blkcache: 3 related devices not checked ("
        + "".join(f"{names[k]}: holder of {names['A']}, " for k in holders)
        + f"{names['E']}: partition of {names['B']}); use -r\n")
    out = blkcache_on(sysfs, "verify", "-J", devs["A"])
    assert [d["name"] for d in json.loads(out.stdout)["not_checked"]] == \
        [*[names[k] for k in holders], names["E"]]

    out = blkcache_on(sysfs, "drop", "-r", devs["A"])
    assert (out.returncode, out.stderr) == (0, "")
    lines = out.stdout.splitlines()
    assert lines[1].startswith(f"{devs[holders[0]]} (holder of {names['A']}): ")
    assert lines[3].startswith(f"{devs['E']} (partition of {names['B']}): ")
    assert {key: kernel.cachestat(fd)["nr_cache"] for key, fd in fds.items()} == \
        dict.fromkeys("ABCE", 0)


def test_without_recursive_the_related_partitions_and_disk_are_named(partitioned, loops):
    disk, p1, p2 = partitioned
    name = os.path.basename(disk)
    out = cliproc.completed("status", disk)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2
    assert out.stderr == (f"blkcache: 2 related devices not checked ({name}p1: partition "
                          f"of {name}, {name}p2: partition of {name}); use -r\n")
    out = cliproc.completed("status", "-J", disk)
    assert [(d["path"], d["relation"]) for d in json.loads(out.stdout)["not_checked"]] == \
        [(p1, "partition"), (p2, "partition")]
    out = cliproc.completed("verify", p1)
    assert out.stderr == (f"blkcache: 1 related device not checked ({name}: disk of "
                          f"{name}p1); use -r\n")
    # Named together, or with -r, or quiet: nothing to say.
    for args in (["verify", p1, disk, p2], ["verify", "-r", p1], ["verify", "-q", p1]):
        assert cliproc.completed(*args).stderr == "", args
    out = cliproc.completed("status", "-r", disk)
    assert [line.split()[-2:] for line in out.stdout.splitlines()] == [
        ["RELATION", "DEVICE"], ["self", disk], [f"partition:{name}", p1],
        [f"partition:{name}", p2]]
