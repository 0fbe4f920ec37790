"""status --holders: processes (fds, mappings), mounts, sysfs holders."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from blkcache import holders as holders_mod

import cliproc
from units import MiB

HOLDER = """
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if sys.argv[2] == "map":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    os.close(fd)                     # only the mapping holds it now
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder_process():
    """Start helper processes holding a device (fd or mapping); kill them by pid."""
    procs = []

    def start(device, how):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, device, how],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()



def test_process_with_fd_and_process_with_mapping(loops, holder_process):
    dev = loops.attach(size=16 * MiB)
    other = loops.attach(size=16 * MiB)
    by_fd = holder_process(dev, "fd")
    by_map = holder_process(dev, "map")
    elsewhere = holder_process(other, "fd")
    found = holders_mod.holders(dev)
    pids = {p.pid: p for p in found.processes}
    assert by_fd.pid in pids and by_map.pid in pids
    assert elsewhere.pid not in pids
    assert len(pids[by_fd.pid].fds) == 1
    assert pids[by_fd.pid].mapped is False
    assert pids[by_map.pid].mapped is True and pids[by_map.pid].fds == ()
    assert pids[by_fd.pid].command.startswith("python")
    # blkcache's own descriptor on the device is not listed.
    assert os.getpid() not in pids
    assert found.mounts == () and found.stacked == ()


def test_status_holders_cli(loops, holder_process):
    dev = loops.attach(size=16 * MiB)
    proc = holder_process(dev, "fd")
    fd = holders_mod.holders(dev).processes[0].fds[0]
    out = cliproc.completed("status", "--holders", dev)
    assert out.returncode == 0, out.stderr
    assert f"{dev}: process {proc.pid} (python" in out.stdout
    line = [ln for ln in out.stdout.splitlines() if f"process {proc.pid} " in ln][0]
    assert line.endswith(f") fd {fd}")
    data = json.loads(cliproc.completed("status", "--holders", "--json", dev).stdout)
    (record,) = data["devices"]
    assert {"pid": proc.pid, "fds": [fd], "mapped": False} == {
        k: v for k, v in [p for p in record["holders"]["processes"]
                          if p["pid"] == proc.pid][0].items() if k != "command"}


def test_nobody_holds_it(loops):
    dev = loops.attach(size=16 * MiB)
    out = cliproc.completed("status", "--holders", "-n", dev)
    assert out.returncode == 0
    assert out.stdout.splitlines()[1] == (
        f"{dev}: no other holder (the cache goes when the last opener closes it)")


def test_mount_is_a_holder(loops):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    dev = loops.attach(size=16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    mnt = tempfile.mkdtemp(prefix="blkcache-mnt-", dir="/var/tmp")
    try:
        subprocess.run(["mount", dev, mnt], check=True, capture_output=True)
        try:
            found = holders_mod.holders(dev)
            assert [(m.mount_point, m.fstype) for m in found.mounts] == [(mnt, "ext4")]
            out = cliproc.completed("status", "--holders", dev)
            assert f"{dev}: mount {mnt} (ext4)" in out.stdout.splitlines()
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        os.rmdir(mnt)


def test_sysfs_holders_read_from_the_holders_directory(loops, tmp_path):
    """No device-mapper here: a sysfs tree naming a real loop device as holder."""
    dev = loops.attach(size=16 * MiB)
    upper = loops.attach(size=16 * MiB)
    rdev = os.stat(dev).st_rdev
    upper_rdev = os.stat(upper).st_rdev
    upper_name = os.path.basename(upper)
    majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    (tmp_path / "dev/block" / majmin / "holders" / upper_name).mkdir(parents=True)
    (tmp_path / "dev/block" / majmin / "holders" / "dm-77").mkdir()
    (tmp_path / "class/block" / upper_name).mkdir(parents=True)
    (tmp_path / "class/block" / upper_name / "dev").write_text(
        f"{os.major(upper_rdev)}:{os.minor(upper_rdev)}\n")
    found = holders_mod.stacked_holders(rdev, sysfs=str(tmp_path))
    assert found == (holders_mod.StackedHolder("dm-77", None),
                     holders_mod.StackedHolder(upper_name, upper))
    # The real sysfs of an unstacked loop device: no holder.
    assert holders_mod.stacked_holders(rdev) == ()


def test_mountinfo_escapes(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("36 35 7:3 / /mnt/with\\040space rw - ext4 /dev/loop3 rw\n"
                    "37 35 7:4 / /other rw - xfs /dev/loop4 rw\n")
    got = holders_mod.mount_holders(os.makedev(7, 3), str(info))
    assert got == (holders_mod.MountHolder("/mnt/with space", "ext4", 36),)
