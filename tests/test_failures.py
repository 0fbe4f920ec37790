"""A failed write-back is remembered: a second drop must not discard the only copy.

After EIO the kernel marks the pages clean and tells each open file once, so
a second `blkcache drop` (a new open file, told nothing) would succeed and
silently discard them.  drop records the failure and refuses until
--discard-failed says the cached data may go.
"""

import errno
import json
import os
import subprocess
import sys
import time

import blkcache

import cliproc
import kernel
import needs
from test_faults import _image_on, mounted
from units import PAGE, MiB


def record_name(device):
    """The failure record's documented name, from stat(2) and sysfs:
    block-MAJOR:MINOR-seqN (N: the disk's sequence number)."""
    rdev = os.stat(device).st_rdev
    with open(f"/sys/block/{os.path.basename(device)}/diskseq") as f:
        seq = int(f.read())
    return f"block-{os.major(rdev)}:{os.minor(rdev)}-seq{seq}"


def _failing_device(loops, mnt):
    """A loop device whose backing tmpfs is too small for 16 MiB of dirty pages."""
    device = loops.attach(_image_on(mnt, 64 * MiB))
    wfd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    os.pwrite(wfd, b"\xc3" * (16 * MiB), 0)
    assert kernel.cachestat(wfd)["nr_dirty"] == 16 * MiB // PAGE
    return device, wfd


def _release(loops, device, wfd):
    os.close(wfd)
    kernel.losetup("-d", device)
    loops.devices.remove(device)


def test_second_drop_after_failed_writeback_is_refused(loops, tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            code, _, err = cliproc.run("drop", device)
            assert code == 5 and "write-back failed" in err
            records = os.listdir(tmp_path / "state" / "writeback-failed")
            assert records == [record_name(device)]
            cached = kernel.Reading(wfd)

            # The operator runs it again: refused, nothing dropped.
            code, out, err = cliproc.run("drop", device)
            line = cliproc.one_error_line(err)
            assert (code, out) == (5, "")
            assert "an earlier write-back of this device failed" in line
            assert f"{16 * MiB // PAGE} pages were dirty" in line
            assert "--discard-failed" in line
            kernel.not_dropped(wfd, cached)
            assert os.pread(wfd, MiB, 15 * MiB) == b"\xc3" * MiB

            # status and verify are read-only: they still answer.
            code, _, _ = cliproc.run("verify", device)
            assert code == 1

            # Said explicitly: the cached data may go.  The record goes too.
            code, out, err = cliproc.run("drop", "--discard-failed", device)
            assert code == 0, err
            assert kernel.cachestat(wfd)["nr_cache"] == 0
            assert os.listdir(tmp_path / "state" / "writeback-failed") == []
        finally:
            _release(loops, device, wfd)


def test_without_the_record_the_kernel_would_let_a_second_drop_discard_the_data(
        loops, tmp_path, monkeypatch):
    """Why the record exists: the second sync on a new fd is told nothing."""
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            try:
                blkcache.drop(device)
            except blkcache.WritebackError:
                pass
            else:
                raise AssertionError("the first drop must fail")
            # A new open file, synced with plain fdatasync(2): no EIO for it.
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)        # raises OSError(EIO) if the kernel told this file
            finally:
                os.close(fd)
            # And the API refuses, with the failure it recorded.
            try:
                blkcache.drop(device)
            except blkcache.WritebackFailedBefore as exc:
                assert exc.failure.dirty == 16 * MiB // PAGE
            else:
                raise AssertionError("the second drop must be refused")
            assert kernel.cachestat(wfd)["nr_cache"] > 0
        finally:
            _release(loops, device, wfd)


def test_an_unrecordable_failure_says_so(loops, tmp_path, monkeypatch):
    """The record cannot be written (state dir is a file): the error says so."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("BLKCACHE_STATE_DIR", str(blocker))
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            cached = kernel.Reading(wfd)
            code, out, err = cliproc.run("drop", device)
            line = cliproc.one_error_line(err)
            assert (code, out) == (5, "")
            assert "write-back failed" in line
            assert "the failure could not be recorded (" in line
            assert "do not drop this device again before the data is safe" in line
            kernel.not_dropped(wfd, cached)
        finally:
            _release(loops, device, wfd)


def test_a_damaged_record_still_refuses(loopdev, tmp_path):
    """A record that cannot be parsed is not taken as 'no failure'."""
    cached = kernel.fill(loopdev.fd, 0, MiB)
    records = tmp_path / "state" / "writeback-failed"
    records.mkdir(parents=True)
    (records / record_name(loopdev)).write_text("{not json")
    code, out, err = cliproc.run("drop", loopdev)
    line = cliproc.one_error_line(err)
    assert (code, out) == (5, "")
    assert "may have failed (record " in line and "cannot be read: damaged" in line
    kernel.not_dropped(loopdev.fd, cached)
    code, _, err = cliproc.run("drop", "--discard-failed", loopdev)
    assert code == 0, err
    assert kernel.cached_pages(loopdev) == 0 and not any(records.iterdir())


# -- issue 10: a record belongs to one device instance ----------------------------

def _reattach_same_number(loops, device, image):
    """Detach ``device`` and attach ``image`` to the same node: a new instance
    with the same major:minor (the way numbers are reused in a fleet)."""
    kernel.losetup("-d", device)
    loops.devices.remove(device)
    kernel.losetup(device, image)
    loops.devices.append(device)


def test_a_record_of_a_detached_instance_blocks_nothing(loops, tmp_path):
    """A failure on one instance; the number is then reused by an unrelated
    device.  Its drop goes ahead; failures/doctor call the record stale, and
    --prune removes it."""
    records = tmp_path / "state" / "writeback-failed"
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        seq = int(open(f"/sys/block/{os.path.basename(device)}/diskseq").read())
        code, _, err = cliproc.run("drop", device)
        assert code == 5 and "write-back failed" in err
        rdev = os.stat(device).st_rdev
        name = f"block-{os.major(rdev)}:{os.minor(rdev)}-seq{seq}"
        assert os.listdir(records) == [name]
        code, out, _ = cliproc.run("failures", "-J")
        [live] = json.loads(out)["failures"]
        assert code == 0 and live["state"] == "live" and live["diskseq"] == seq
        assert live["dirty"] == 16 * MiB // PAGE and live["errno"] in (errno.EIO,
                                                                        errno.ENOSPC)
        os.close(wfd)
        # The same node, another volume: a new instance.
        _reattach_same_number(loops, device, loops.image(32 * MiB))
    assert int(open(f"/sys/block/{os.path.basename(device)}/diskseq").read()) != seq
    fd = loops.hold(device)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fd, 0, 4 * MiB)
    before = kernel.cachestat(fd)["nr_cache"]
    assert before > 512
    code, out, err = cliproc.run("drop", device)
    assert (code, err) == (0, ""), (out, err)
    assert kernel.cachestat(fd)["nr_cache"] == 0

    code, out, _ = cliproc.run("doctor", "-J")
    report = json.loads(out)
    [stale] = report["failures"]
    assert code == 0 and stale["state"] == "stale" and stale["diskseq"] == seq
    assert stale["rdev"] == f"{os.major(rdev)}:{os.minor(rdev)}"
    assert not any(name in p["problem"] for p in report["problems"])
    code, out, _ = cliproc.run("doctor")
    assert "stale: that device instance is gone, it blocks nothing" in out
    code, out, _ = cliproc.run("failures")
    assert out.splitlines()[1].split()[0] == "stale"
    code, out, _ = cliproc.run("failures", "--prune")
    assert code == 0 and f"removed {records / name}" in out
    assert os.listdir(records) == []


def test_a_record_without_instance_still_blocks_its_number(loopdev, tmp_path):
    """What a kernel without diskseq (or an older blkcache) writes: block-MAJ:MIN.
    It cannot tell instances apart, so it blocks (the conservative choice),
    doctor says 'unknown', and failures --clear lifts it without a drop."""
    from blkcache import failures

    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, 4 * MiB)
    records = tmp_path / "state" / "writeback-failed"
    records.mkdir(parents=True)
    rdev = os.stat(loopdev).st_rdev
    legacy = f"block-{os.major(rdev)}:{os.minor(rdev)}"
    (records / legacy).write_text(json.dumps(
        {"path": str(loopdev), "errno": errno.EIO, "dirty": 7, "when": 1.0e9}))
    assert failures.key_of(loopdev.fd).names()[1] == legacy
    before = kernel.cachestat(loopdev.fd)["nr_cache"]
    code, out, err = cliproc.run("drop", loopdev)
    assert (code, out) == (5, "") and f"record {records / legacy};" in err
    assert ("recorded without a disk sequence number, so it may be about another device "
            f"that had the number {os.major(rdev)}:{os.minor(rdev)}") in err
    assert kernel.cachestat(loopdev.fd)["nr_cache"] > before // 2
    code, out, _ = cliproc.run("doctor", "-J")
    [unknown] = json.loads(out)["failures"]
    assert unknown["state"] == "unknown" and unknown["diskseq"] is None
    code, out, err = cliproc.run("failures", "--clear", loopdev)
    assert code == 0 and f"removed {records / legacy}" in out, err
    assert os.listdir(records) == []
    code, out, err = cliproc.run("drop", loopdev)
    assert code == 0, err


DELAYED_SYNC = ["-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync",
                "-e", "inject=fdatasync:delay_exit=3000000"]


def test_two_concurrent_drops_cannot_both_miss_the_failure(loops, scratch_dir):
    """A's fdatasync fails, and returns late (strace delays its exit by 3 s).
    B starts meanwhile: the kernel has told A only, so B's own sync succeeds.
    B must wait for A's lock, find A's record and refuse: the pages A could
    not write stay cached."""
    strace = needs.need_tool("strace", "strace")
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device, wfd = _failing_device(loops, mnt)
        try:
            a = subprocess.Popen([strace, *DELAYED_SYNC, sys.executable, "-m", "blkcache",
                                  "drop", device], env=cliproc.env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                # A's write-back has run (and failed) when no page is dirty any more.
                deadline = time.monotonic() + 20
                while kernel.cachestat(wfd)["nr_dirty"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert kernel.cachestat(wfd)["nr_dirty"] == 0
                time.sleep(0.5)             # A is inside its delayed fdatasync
                assert a.poll() is None
                cached = kernel.cachestat(wfd)["nr_cache"]
                code, out, err = cliproc.run("drop", device)
            finally:
                a_out, a_err = a.communicate(timeout=60)
            assert a.returncode == 5 and "write-back failed" in a_err, (a_out, a_err)
            line = cliproc.one_error_line(err)
            assert (code, out) == (5, ""), err
            assert "an earlier write-back of this device failed" in line
            # Without the lock B would have dropped all of them.
            assert kernel.cachestat(wfd)["nr_cache"] > cached // 2
            assert os.pread(wfd, MiB, 15 * MiB) == b"\xc3" * MiB
        finally:
            _release(loops, device, wfd)


def test_a_record_that_cannot_be_removed_after_a_discarding_drop_is_a_warning(
        loopdev, tmp_path):
    """drop --discard-failed did its job; the record's directory is read-only:
    a warning, exit 0, and the record stays (later drops still refuse)."""
    from blkcache import failures

    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, 4 * MiB)
    records = tmp_path / "state" / "writeback-failed"
    records.mkdir(parents=True)
    name = failures.key_of(loopdev.fd).name
    (records / name).write_text(json.dumps(
        {"path": str(loopdev), "errno": errno.EIO, "dirty": 3, "when": 1.0e9}))
    subprocess.run(["mount", "--bind", str(records), str(records)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(records)], check=True)
        code, out, err = cliproc.run("drop", "--discard-failed", loopdev)
        line = cliproc.one_error_line(err)
        assert code == 0, err
        assert line.startswith(f"blkcache: warning: {loopdev}: the record ")
        assert f"could not be removed ({records / name}: Read-only file system)" in line
        assert "-> 0 pages cached" in out
        assert kernel.cachestat(loopdev.fd)["nr_cache"] == 0
        assert os.listdir(records) == [name]
    finally:
        cliproc.umount(str(records))


def test_a_partition_record_lives_as_long_as_its_disk_instance(partitioned, loops):
    """A partition has its disk's sequence number: its record is live (and
    refuses) while that disk instance is attached."""
    from blkcache import failures

    disk, p1, _ = partitioned
    fd = loops.hold(p1)
    key = failures.key_of(fd)
    with open(f"/sys/block/{os.path.basename(disk)}/diskseq") as f:
        assert key.seq == int(f.read())
    assert key.rdev == f"{os.major(os.stat(p1).st_rdev)}:{os.minor(os.stat(p1).st_rdev)}"
    records = os.path.join(os.environ["BLKCACHE_STATE_DIR"], "writeback-failed")
    os.makedirs(records)
    with open(os.path.join(records, key.name), "w") as f:
        json.dump({"path": p1, "errno": errno.EIO, "dirty": 1, "when": 1.0e9}, f)
    code, out, _ = cliproc.run("failures", "-J")
    assert [r["state"] for r in json.loads(out)["failures"]] == ["live"]
    code, out, err = cliproc.run("drop", p1)
    assert code == 5 and "an earlier write-back of this device failed" in err
