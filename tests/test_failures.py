"""A failed write-back is remembered: a second drop must not discard the only copy.

After EIO the kernel marks the pages clean and tells each open file once, so
a second `blkcache drop` (a new open file, told nothing) would succeed and
silently discard them.  drop records the failure and refuses until
--discard-failed says the cached data may go.
"""

import os

import blkcache

import cliproc
import kernel
from test_faults import _image_on, mounted
from units import PAGE, MiB


def record_name(device):
    """The failure record's documented name, from stat(2): block-MAJOR:MINOR."""
    rdev = os.stat(device).st_rdev
    return f"block-{os.major(rdev)}:{os.minor(rdev)}"


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
