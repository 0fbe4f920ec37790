"""status --holders: processes (fds, mappings), mounts, sysfs holders."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from blkcache import holders as holders_mod

import cliproc
import needs
import unprivileged
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
print("ready", fd, flush=True)
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
        word, fd = proc.stdout.readline().split()
        assert word == "ready"
        proc.fd = int(fd)            # the holder's own word for its descriptor
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
    assert pids[by_fd.pid].fds == (by_fd.fd,)
    assert pids[by_fd.pid].mapped is False
    assert pids[by_map.pid].mapped is True and pids[by_map.pid].fds == ()
    assert pids[by_fd.pid].command.startswith("python")
    # blkcache's own descriptor on the device is not listed.
    assert os.getpid() not in pids
    assert found.mounts == () and found.stacked == ()


def test_status_holders_cli(loops, holder_process):
    dev = loops.attach(size=16 * MiB)
    proc = holder_process(dev, "fd")
    fd = proc.fd
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
    needs.need_tool("mkfs.ext4", "e2fsprogs")
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


MANY_FDS = """
import os, sys
fds = [os.open(sys.argv[1], os.O_RDONLY) for _ in range(int(sys.argv[2]))]
print(" ".join(map(str, fds)), flush=True)
sys.stdin.read()
"""


def test_a_process_with_many_descriptors_lists_them_all_in_order(loops):
    """More records than the first buffer holds (64): the scan is retried."""
    dev = loops.attach(size=16 * MiB)
    proc = subprocess.Popen([sys.executable, "-c", MANY_FDS, dev, "150"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fds = tuple(sorted(int(x) for x in proc.stdout.readline().split()))
        found = {p.pid: p for p in holders_mod.holders(dev).processes}
        assert found[proc.pid].fds == fds and len(fds) == 150
        assert found[proc.pid].mapped is False
    finally:
        proc.kill()
        proc.wait()


# The oracle for the scan as nobody: the /proc walk blkcache once did in
# Python, run as nobody too.  Prints {"holders": {pid: [fds, mapped]}, "unreadable": n}.
ORACLE = r"""
import json, os, stat, sys
dev = sys.argv[1]
st = os.stat(dev)
rdev, node = st.st_rdev, (st.st_dev, st.st_ino)
holders, unreadable = {}, 0
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    try:
        fds = []
        for fd in os.listdir(f"/proc/{name}/fd"):
            try:
                if not os.readlink(f"/proc/{name}/fd/{fd}").startswith("/dev/"):
                    continue
                s = os.stat(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISBLK(s.st_mode) and s.st_rdev == rdev:
                fds.append(int(fd))
        mapped = False
        with open(f"/proc/{name}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and int(parts[4]):
                    major, minor = (int(x, 16) for x in parts[3].split(":"))
                    if (os.makedev(major, minor), int(parts[4])) == node:
                        mapped = True
    except PermissionError:
        unreadable += 1
        continue
    except OSError:
        continue
    if fds or mapped:
        holders[name] = [sorted(fds), mapped]
print(json.dumps({"holders": holders, "unreadable": unreadable}))
"""


def test_nobody_gets_the_same_answers(loops, nobody, holder_process):
    """As nobody: its own processes' fds and mappings are found (the mapping
    through a node outside /dev: the maps name that node's inode), other
    users' processes are counted unreadable, never listed -- as the /proc
    walk finds them."""
    dev = loops.attach(size=16 * MiB)
    rdev = os.stat(dev).st_rdev
    node_dir = tempfile.mkdtemp(prefix="blkcache-node-", dir="/var/tmp")
    node = os.path.join(node_dir, "dev")
    procs = []
    try:
        os.chmod(node_dir, 0o755)
        os.mknod(node, 0o666 | stat.S_IFBLK, rdev)
        os.chmod(node, 0o666)
        by_root = holder_process(dev, "fd")
        with unprivileged.node_mode(dev, 0o666):
            for path, how in ((dev, "fd"), (node, "map")):
                proc = subprocess.Popen(
                    [*unprivileged.SETPRIV, "--", nobody.python, "-s", "-B", "-c", HOLDER,
                     path, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    env=nobody.env, cwd="/")
                procs.append(proc)
                assert proc.stdout.readline().split()[:1] == ["ready"]
            by_fd, by_map = procs
            before = json.loads(nobody.py(ORACLE, node).stdout)
            out = nobody.blkcache("status", "--holders", "--json", node)
            after = json.loads(nobody.py(ORACLE, node).stdout)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(node_dir)
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)["devices"]
    got = {str(p["pid"]): [p["fds"], p["mapped"]] for p in record["holders"]["processes"]}
    assert got == before["holders"] == after["holders"]
    assert set(got) == {str(by_fd.pid), str(by_map.pid)}
    assert got[str(by_fd.pid)][0] and got[str(by_map.pid)] == [[], True]
    assert str(by_root.pid) not in got
    low = min(before["unreadable"], after["unreadable"])
    high = max(before["unreadable"], after["unreadable"])
    assert 0 < 0.8 * low <= record["holders"]["unreadable"] <= 1.2 * high
