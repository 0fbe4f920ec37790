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
    # Without --recursive: the disk only.
    out = cliproc.completed("status", "-n", disk)
    assert (out.returncode, out.stderr, len(out.stdout.splitlines())) == (0, "", 1)
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
    pages = int(disk_row.split()[2])
    kernel.between(before, pages, after, disk)
    verdict = "resident" if pages else "clean"
    assert disk_row.startswith(f"{disk}: {verdict}: {pages} of 8192 pages ("), disk_row
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
