"""The state directory of failed write-back records is trusted only when it
deserves it (issue 10, point 2): explicit modes whatever the umask, no symbolic
link, owned by root or the caller, not writable by group or others; records
read only as small regular files, never followed, never blocking.

Run as root and as nobody (tests/unprivileged.py).  Page counts come from the
raw cachestat(2) oracle; "nothing was dropped" is shown by a margin a drop
would cross (it removes nearly every page) and reclaim cannot.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from blkcache import failures

import cliproc
import kernel
from test_failures import _failing_device, _release
from test_faults import mounted
from unprivileged import node_mode

MiB = 1 << 20
NOBODY_UID = 65534


@pytest.fixture
def state_root(monkeypatch):
    """BLKCACHE_STATE_DIR: a fresh directory under /var/tmp that nobody can
    reach (the parent is 0755), removed afterwards."""
    parent = tempfile.mkdtemp(prefix="blkcache-state-", dir="/var/tmp")
    os.chmod(parent, 0o755)
    root = os.path.join(parent, "state")
    monkeypatch.setenv("BLKCACHE_STATE_DIR", root)
    yield root
    shutil.rmtree(parent, ignore_errors=True)


def _cached(loopdev, mib=4):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, mib * MiB)
    pages = kernel.cachestat(loopdev.fd)["nr_cache"]
    assert pages > mib * MiB // kernel.PAGE // 2
    return pages


def _as_nobody(nobody, state_root, *args):
    """blkcache ARGS as nobody, with BLKCACHE_STATE_DIR=state_root."""
    saved = nobody.env
    nobody.env = dict(saved, BLKCACHE_STATE_DIR=state_root)
    try:
        return nobody.blkcache(*args)
    finally:
        nobody.env = saved


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- created with explicit modes ---------------------------------------------------

def test_umask_077_does_not_lock_out_later_drops_and_a_planted_link_is_not_followed(
        loops, state_root, nobody, scratch_dir):
    """Root's failing drop (--discard-failed: the cache may go, but the sync
    fails again) runs under umask 077 and finds a symbolic link planted where
    its record goes.  The directories are 0755 and the record 0644 all the
    same, the link is replaced (its target untouched), and a later drop by
    nobody of another device is not refused."""
    records = os.path.join(state_root, "writeback-failed")
    victim = os.path.join(scratch_dir, "victim")
    with open(victim, "w") as f:
        f.write("precious")
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            name = failures.key_of(wfd).name
            os.makedirs(records, mode=0o755)
            os.chmod(state_root, 0o755)
            os.symlink(victim, os.path.join(records, name))
            proc = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable,
                                   "-m", "blkcache", "drop", "--discard-failed", device],
                                  capture_output=True, text=True, env=cliproc.env(),
                                  timeout=60)
            assert proc.returncode == 5 and "write-back failed" in proc.stderr, proc.stderr
            assert f"record {records}/{name})" in proc.stderr
        finally:
            _release(loops, device, wfd)
    assert open(victim).read() == "precious"
    record = os.path.join(records, name)
    assert stat.S_ISREG(os.lstat(record).st_mode) and _mode(record) == 0o644
    assert json.load(open(record))["errno"] > 0

    # Made by blkcache itself under umask 077: still 0755.
    shutil.rmtree(state_root)
    other = loops.attach(size=16 * MiB)
    fd = loops.hold(other)
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            proc = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable,
                                   "-m", "blkcache", "drop", device],
                                  capture_output=True, text=True, env=cliproc.env(),
                                  timeout=60)
            assert proc.returncode == 5 and "write-back failed" in proc.stderr
        finally:
            _release(loops, device, wfd)
    assert (_mode(state_root), _mode(records)) == (0o755, 0o755)
    assert [_mode(os.path.join(records, n)) for n in os.listdir(records)] == [0o644]

    # nobody drops an unrelated device: the records are readable, none is its.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fd, 0, 4 * MiB)
    with node_mode(other, 0o666):
        proc = _as_nobody(nobody, state_root, "drop", "--method", "fadvise", other)
    assert proc.returncode == 0, proc.stderr
    assert kernel.cachestat(fd)["nr_cache"] == 0


# -- planted records ------------------------------------------------------------------

def _plant(kind, path, scratch):
    if kind == "symlink to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "symlink to a file":
        target = os.path.join(scratch, "victim")
        with open(target, "w") as f:
            f.write('{"path": "x", "errno": 5, "when": 1}')
        os.symlink(target, path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "character device":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))     # /dev/zero
    elif kind == "huge file":
        with open(path, "wb") as f:
            f.truncate(64 << 30)
    elif kind == "directory":
        os.mkdir(path)


PLANTED = {"symlink to /dev/zero": "a symbolic link",
           "symlink to a file": "a symbolic link",
           "FIFO": "not a regular file (a FIFO)",
           "character device": "not a regular file (a character device)",
           "huge file": f"larger than {failures.MAX_RECORD} bytes ({64 << 30})",
           "directory": "not a regular file (a directory)"}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_a_planted_record_is_refused_at_once(loopdev, state_root, scratch_dir, kind):
    records = os.path.join(state_root, "writeback-failed")
    os.makedirs(records)
    name = failures.key_of(loopdev.fd).name
    _plant(kind, os.path.join(records, name), scratch_dir)
    before = _cached(loopdev)
    started = time.monotonic()
    code, out, err = cliproc.run("drop", loopdev, timeout=30)
    elapsed = time.monotonic() - started
    line = cliproc.one_error_line(err)
    assert (code, out) == (5, "")
    assert (f"may have failed (record {records}/{name} cannot be read: {PLANTED[kind]})"
            in line)
    assert "nothing was dropped" in line
    assert elapsed < 10
    assert kernel.cachestat(loopdev.fd)["nr_cache"] > before // 2
    # Listing them is as safe: failures and doctor answer, at once.
    code, out, err = cliproc.run("failures", "-J", timeout=30)
    [listed] = json.loads(out)["failures"]
    assert code == 0 and listed["problem"] == PLANTED[kind], err
    code, out, err = cliproc.run("doctor", timeout=30)
    assert code == 0 and f"cannot be read ({PLANTED[kind]})" in out, err


# -- untrusted directories ---------------------------------------------------------------

def _untrust(how, state_root, scratch):
    """Make the state directory untrusted; the directory the message names."""
    records = os.path.join(state_root, "writeback-failed")
    if how == "symlink":
        real = os.path.join(scratch, "real-state")
        os.makedirs(os.path.join(real, "writeback-failed"))
        os.symlink(real, state_root)
        return state_root, "state directory is a symbolic link: not trusted"
    os.makedirs(records)
    if how == "records 0777":
        os.chmod(records, 0o777)
        return records, "writable by group or others (mode 0777)"
    if how == "base 0775":
        os.chmod(state_root, 0o775)
        return state_root, "writable by group or others (mode 0775)"
    os.chown(state_root, NOBODY_UID, -1)
    return state_root, f"owned by uid {NOBODY_UID}, not by root or this user (uid 0)"


@pytest.mark.parametrize("how", ["records 0777", "base 0775", "owned by nobody", "symlink"])
def test_an_untrusted_state_dir_refuses_with_the_fix(loopdev, state_root, scratch_dir, how):
    shown, why = _untrust(how, state_root, scratch_dir)
    before = _cached(loopdev)
    code, out, err = cliproc.run("drop", loopdev)
    line = cliproc.one_error_line(err)
    assert (code, out) == (5, "")
    assert line.startswith(f"blkcache: {shown}: state directory")
    assert why in line and "nothing was dropped" in line and "(fix: " in line
    assert kernel.cachestat(loopdev.fd)["nr_cache"] > before // 2
    code, out, err = cliproc.run("failures")
    assert (code, out) == (5, "") and why in cliproc.one_error_line(err)
    code, out, err = cliproc.run("doctor", "-J")
    problems = json.loads(out)["problems"]
    assert code == 0 and any(p["subject"] == shown and why in p["problem"] and p["fix"]
                             for p in problems)
    # The operator says the cache may go: the drop goes ahead, with a warning.
    code, out, err = cliproc.run("drop", "--discard-failed", loopdev)
    assert code == 0 and "no record consulted or removed" in cliproc.one_error_line(err)
    assert kernel.cachestat(loopdev.fd)["nr_cache"] == 0


@pytest.mark.parametrize("owner, mode, trusted", [
    ("nobody", 0o755, True), ("root", 0o755, True),
    ("daemon", 0o755, False), ("nobody", 0o777, False)])
def test_as_nobody_only_a_dir_of_root_or_nobody_is_used(loops, state_root, nobody, owner,
                                                        mode, trusted):
    """nobody drops a device it may write; the state directory belongs to
    ``owner`` with ``mode``."""
    import pwd

    records = os.path.join(state_root, "writeback-failed")
    os.makedirs(records)
    uid = pwd.getpwnam(owner).pw_uid
    for path in (state_root, records):
        os.chown(path, uid, -1)
    os.chmod(state_root, mode)
    device = loops.attach(size=16 * MiB)
    fd = loops.hold(device)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fd, 0, 4 * MiB)
    before = kernel.cachestat(fd)["nr_cache"]
    with node_mode(device, 0o666):
        proc = _as_nobody(nobody, state_root, "drop", "--method", "fadvise", device)
    if trusted:
        assert (proc.returncode, proc.stderr) == (0, "")
        assert kernel.cachestat(fd)["nr_cache"] == 0
    else:
        assert proc.returncode == 5 and proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"blkcache: {state_root}: state directory not trusted: ")
        assert "nothing was dropped" in line and "(fix: " in line
        assert kernel.cachestat(fd)["nr_cache"] > before // 2
