"""libvirt itself runs the blkcache hook: real libvirtd, real QEMU (TCG), loop devices.

Clients act through virsh alone.  Every daemon is private (tests/libvirtd.py):
its own namespace, configuration, runtime and log directories; the hook is
installed in it with `blkcache hook libvirt --install` before libvirtd starts.
Page counts come from the test's own cachestat(2) (tests/kernel.py) on fds the
test holds, and are bounded, never compared for equality across time: the
machine reclaims page cache by itself (a few % per minute), so "gone" is ~0
while a control device held the same way keeps most of its pages.
"""

import glob
import mmap
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

import cliproc
import kernel
import libvirtd
from libvirtd import block_disk, domain_xml
from needs import missing, need_tool
from test_recursive import add_partitions, wait_for
from units import PAGE, MiB

# The planted range: away from the boot sector and whatever SeaBIOS reads.
OFF, LEN = 16 * MiB, 32 * MiB
PLANTED = LEN // PAGE
TOOLS = {"virsh": "libvirt-clients", "libvirtd": "libvirt-daemon",
         "virtlogd": "libvirt-daemon", "qemu-system-x86_64": "qemu-system-x86",
         "qemu-storage-daemon": "qemu-system-common", "unshare": "util-linux",
         "nsenter": "util-linux"}


@pytest.fixture(scope="module")
def libvirt_tools(loop_available):
    for tool, package in TOOLS.items():
        need_tool(tool, package)
    if not any(glob.glob(f"{lib}/libvirt/connection-driver/libvirt_driver_qemu.so")
               for lib in ("/usr/lib/*", "/usr/lib64", "/usr/lib")):
        missing("libvirt's QEMU driver is not installed (apt-get install "
                "libvirt-daemon-driver-qemu)")


@pytest.fixture(scope="module")
def daemons_dir(libvirt_tools):
    path = tempfile.mkdtemp(prefix="blkcache-libvirt-", dir="/var/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(daemons_dir):
    """One libvirtd with the blkcache hook, shared by the tests of this file and
    stopped after them."""
    d = libvirtd.Daemon(os.path.join(daemons_dir, "a"), f"blkcache-a-{os.getpid()}")
    try:
        d.start()
        yield d
    finally:
        d.stop()


class Domains:
    """Domains the test defined; destroyed and undefined at the end."""

    def __init__(self):
        self.defined = []

    def define(self, daemon, disks, **kw):
        name = f"blkcache-test-{uuid.uuid4().hex[:8]}"
        daemon.define(domain_xml(name, disks, **kw), name)
        self.defined.append((daemon, name))
        return name

    def cleanup(self):
        for daemon, name in self.defined:
            if daemon.state(name) not in (None, "shut off"):
                daemon.virsh("destroy", name, check=False)
            daemon.virsh("undefine", name, check=False)


@pytest.fixture
def domains(loops):
    """Depends on loops: domains end before their loop devices are detached."""
    manager = Domains()
    try:
        yield manager
    finally:
        manager.cleanup()


def plant(fd, offset=OFF, length=LEN):
    """Read [offset, offset+length) into the page cache; the oracle's count."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return kernel.fill(fd, offset, length)


def cached(fd, offset=OFF, length=LEN):
    return kernel.cachestat(fd, offset, length)["nr_cache"]


def hook_lines(daemon, guest, event):
    """What the hook said for ``guest`` on ``event``, from libvirtd's log."""
    prefix = f"blkcache-hook: {guest} {event}: "
    out = []
    for line in daemon.log().splitlines():
        line = line.split("stderr: '", 1)[-1]
        if line.startswith(prefix):
            out.append(line[len(prefix):])
    return out


def test_start_drops_what_was_cached_before(daemon, domains, loops):
    disk, control = loops.attach(size=64 * MiB), loops.attach(size=64 * MiB)
    fds = {dev: loops.hold(dev) for dev in (disk, control)}
    before = {dev: plant(fd) for dev, fd in fds.items()}
    assert min(before.values()) >= 0.95 * PLANTED, before
    name = domains.define(daemon, block_disk(disk))
    started = time.monotonic()
    daemon.virsh("start", name)
    elapsed = time.monotonic() - started
    assert daemon.state(name) == "running"
    after = {dev: cached(fd) for dev, fd in fds.items()}
    assert daemon.install_output.startswith(f"installed {libvirtd.HOOK}\n")
    assert after[disk] <= 0.01 * PLANTED, after          # gone: the hook dropped them
    assert after[control] >= 0.8 * before[control], after   # held the same way: kept
    # libvirt ran the hook on each start event, and logged what it said.
    runs = daemon.hook_runs(name)
    assert [event for event, _ in runs] == ["prepare begin", "start begin",
                                            "started begin"], runs
    for event, _ in runs:
        assert hook_lines(daemon, name, event)[-1].startswith(
            "page cache of 1 block device dropped and verified in ")
    lines = hook_lines(daemon, name, "prepare begin")
    assert f"1 block device: {disk}" in lines, lines
    dropped = [int(m[1]) for m in (re.match(rf"{disk}: (\d+) -> 0 pages cached", line)
                                   for line in lines) if m]
    assert len(dropped) == 1 and after[disk] <= dropped[0] <= before[disk], lines
    assert dropped[0] >= 0.9 * before[disk]
    print(f"\nvirsh start: {elapsed:.2f} s; hook runs (event, s): {runs}")


def test_dirty_pages_make_start_fail_and_stay(daemon, domains, loops):
    disk = loops.attach(size=64 * MiB)
    wfd = loops.hold(disk, os.O_RDWR)
    name = domains.define(daemon, block_disk(disk))
    data = os.urandom(MiB)
    os.pwrite(wfd, data, OFF)                       # dirty: not written back yet
    written = time.monotonic()
    assert kernel.cachestat(wfd, OFF, MiB)["nr_dirty"] >= 0.9 * MiB // PAGE
    proc = daemon.virsh("start", name, check=False)
    assert proc.returncode != 0
    assert f"blkcache-hook: {name} prepare begin: {disk}: " in proc.stderr, proc.stderr
    assert re.search(rf"{disk}: dirty: \d+ cached pages match the device, "
                     r"2[3-5]\d dirty pages not compared", proc.stderr), proc.stderr
    assert f"blkcache-hook: {name} prepare begin: page cache not dropped; refusing " \
           "prepare" in proc.stderr
    assert daemon.state(name) == "shut off"
    if time.monotonic() - written < 25:     # before the kernel's own 30 s write-back
        assert kernel.cachestat(wfd, OFF, MiB)["nr_dirty"] >= 0.9 * MiB // PAGE
    os.fsync(wfd)
    assert kernel.read_direct(disk, OFF, MiB) == data
    # libvirt ran the hook once to start, then to clean up (events it ignores).
    runs = daemon.hook_runs(name)
    assert [event for event, _ in runs] == ["prepare begin", "stopped end",
                                            "release end"], runs
    assert hook_lines(daemon, name, "stopped end") == []
    print(f"\nvirsh start refused: {proc.stderr.strip()}")


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def nbd_export(loops):
    """A loop device exported over NBD by qemu-storage-daemon: (device, port, fd)."""
    dev = loops.attach(size=64 * MiB)
    fd = loops.hold(dev)
    port = libvirtd.free_port()
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=host_device,node-name=vol,filename={dev},read-only=on",
         "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
         "--export", "type=nbd,id=exp,node-name=vol,name=vol"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
            time.sleep(0.1)
        yield dev, port, fd
    finally:
        libvirtd._end(proc)


def test_file_network_and_metadata_disks_are_left_alone(daemon, domains, loops, nbd_export):
    """A file disk, an NBD disk and a block device named only in <metadata>:
    the domain starts and the hook drops nothing."""
    nbd_dev, port, nbd_fd = nbd_export
    meta = loops.attach(size=64 * MiB)
    meta_fd = loops.hold(meta)
    image = daemon.path("/var/lib/libvirt/images/file-disk.raw")
    os.makedirs(os.path.dirname(image), exist_ok=True)
    with open(image, "wb") as f:
        f.write(os.urandom(OFF + LEN))
    file_fd = os.open(image, os.O_RDONLY)
    try:
        before = {"nbd": plant(nbd_fd), "meta": plant(meta_fd), "file": plant(file_fd)}
        assert min(before.values()) >= 0.95 * PLANTED, before
        disks = f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source file='/var/lib/libvirt/images/file-disk.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source protocol='nbd' name='vol'><host name='127.0.0.1' port='{port}'/></source>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>"""
        metadata = (f"<bk:volumes xmlns:bk='http://example.org/blkcache-test'>"
                    f"<disk type='block'><source dev='{meta}'/></disk></bk:volumes>")
        name = domains.define(daemon, disks, metadata=metadata)
        assert meta in daemon.virsh("dumpxml", name).stdout    # libvirt kept it
        daemon.virsh("start", name)
        assert daemon.state(name) == "running"
        after = {"nbd": cached(nbd_fd), "meta": cached(meta_fd), "file": cached(file_fd)}
    finally:
        os.close(file_fd)
    for key in before:
        assert after[key] >= 0.8 * before[key], (key, before, after)
    runs = daemon.hook_runs(name)
    assert [event for event, _ in runs] == ["prepare begin", "start begin",
                                            "started begin"], runs
    for event, _ in runs:
        assert hook_lines(daemon, name, event) == ["no block device to drop"]


# ---- live migration: two daemons on this machine stand for two hypervisors ----

# The destination's views of the shared volume that the test makes stale: a range
# of the whole device, and a partition (QEMU >= 4.0 drops the cache of the device it
# opens when an incoming migration takes over -- never that of a partition).
WHOLE_OFF = 8 * MiB
PART_OFF, PART_LEN = 32 * MiB, 16 * MiB
STALE_LEN = 16 * MiB


@pytest.fixture
def destination(daemons_dir, daemon, loops):
    """A second libvirtd with the hook, its own hostname and host UUID (depends on
    loops: its domains end before the loop devices are detached)."""
    d = libvirtd.Daemon(tempfile.mkdtemp(prefix="b-", dir=daemons_dir),
                        f"blkcache-b-{os.getpid()}")
    try:
        d.start(capabilities_from=daemon)
        yield d
    finally:
        d.stop()


def write_direct(dev, offset, data):
    """The source host writes: O_DIRECT through its own view, then fsync."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_live_migration_leaves_no_stale_page_on_the_destination(daemon, destination,
                                                                 domains, loops):
    image = loops.image(64 * MiB)
    src = loops.attach(image)
    dst = loops.attach(image, partscan=True)
    add_partitions(dst, [(PART_OFF, PART_LEN)])
    part = f"{dst}p1"
    assert wait_for(part, 10), f"{part} did not appear"
    control = loops.attach(size=64 * MiB)
    name = domains.define(daemon, block_disk(src))
    daemon.virsh("start", name)
    # The destination host read the volume (stale views), then the source wrote.
    fds = {"whole": loops.hold(dst), "part": loops.hold(part), "control": loops.hold(control)}
    views = {"whole": (fds["whole"], WHOLE_OFF), "part": (fds["part"], 0),
             "control": (fds["control"], WHOLE_OFF)}
    planted = {key: plant(fd, off, STALE_LEN) for key, (fd, off) in views.items()}
    assert min(planted.values()) >= 0.95 * STALE_LEN // PAGE, planted
    new = {"whole": os.urandom(STALE_LEN), "part": os.urandom(STALE_LEN)}
    write_direct(src, WHOLE_OFF, new["whole"])
    write_direct(src, PART_OFF, new["part"])
    for key in ("whole", "part"):
        fd, off = views[key]
        assert os.pread(fds[key], PAGE, off + STALE_LEN // 2) != \
            new[key][STALE_LEN // 2:STALE_LEN // 2 + PAGE]            # stale, really
    dst_xml = os.path.join(destination.root, f"{name}-migrate.xml")
    with open(dst_xml, "w") as f:
        f.write(daemon.virsh("dumpxml", "--migratable", name).stdout.replace(
            f"'{src}'", f"'{dst}'"))
    started = time.monotonic()
    proc = daemon.virsh("migrate", "--live", "--verbose", name, destination.uri,
                        "--migrateuri", f"tcp://127.0.0.1:{libvirtd.free_port()}",
                        "--xml", dst_xml, check=False)
    wall = time.monotonic() - started
    domains.defined.append((destination, name))
    assert proc.returncode == 0, proc.stderr
    assert destination.state(name) == "running"
    assert daemon.state(name) in (None, "shut off")
    after = {key: cached(fd, off, STALE_LEN) for key, (fd, off) in views.items()}
    # No page from before the handover is left in the destination's views...
    assert after["whole"] <= 0.01 * planted["whole"], after
    assert after["part"] <= 0.01 * planted["part"], after
    assert after["control"] >= 0.8 * planted["control"], after
    # ...blkcache finds every cached page of them coherent with the device...
    code, out, err = cliproc.run("verify", "--coherence", "--recursive", dst)
    assert (code, err) == (0, ""), out + err
    assert f"{dst}: coherent: " in out
    assert f"{part} (partition of {os.path.basename(dst)}): coherent: " in out
    # ...and a reader on the destination gets the source's bytes.
    assert kernel.read_buffered(fds["whole"], WHOLE_OFF, STALE_LEN) == new["whole"]
    assert kernel.read_buffered(fds["part"], 0, STALE_LEN) == new["part"]
    # The destination's libvirt ran the hook: it found the stale pages and dropped them.
    runs = destination.hook_runs(name)
    assert [event for event, _ in runs] == ["migrate begin", "prepare begin",
                                            "start begin", "started begin"], runs
    lines = hook_lines(destination, name, "migrate begin")
    assert lines[0] == f"1 block device: {dst}", lines
    for dev, key in ((dst, "whole"), (part, "part")):
        stale = [int(m[1]) for m in (re.match(rf"{dev}: stale: (\d+) of \d+ compared", line)
                                     for line in lines) if m]
        assert len(stale) == 1 and 0.8 * planted[key] <= stale[0] <= planted[key], lines
        assert any(re.match(rf"{dev}: \d+ -> 0 pages cached", line) for line in lines), lines
    assert lines[-1].startswith("page cache of 1 block device dropped and verified in ")
    inside = [hook_lines(destination, name, event)[-1].rsplit(" in ", 1)[-1]
              for event, _ in runs]
    print(f"\nvirsh migrate --live: {wall:.2f} s; destination hook runs (event, s): {runs}; "
          f"of which in-process (imports, checks, drops): {inside}")
