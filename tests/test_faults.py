"""Faults: failed write-back, a device that goes away or shrinks, read-only and
mounted devices, mapped pages.  Every answer is checked against raw
cachestat(2) (tests/kernel.py), and nothing may be lost or hang."""

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

import blkcache

import cliproc
import kernel
import needs
from units import PAGE, MiB


@contextlib.contextmanager
def mounted(*args):
    """Mount in a fresh temporary directory; unmount and remove it at the end."""
    where = tempfile.mkdtemp(prefix="blkcache-mnt-")
    try:
        subprocess.run(["mount", *args, where], check=True, capture_output=True)
        try:
            yield where
        finally:
            _detach_backed_by(where)
            cliproc.umount(where)
    finally:
        os.rmdir(where)


def _detach_backed_by(where):
    """Detach the loop devices whose backing files are in ``where`` (a test
    that failed half-way may have left one; they are ours: the mount is)."""
    for name in os.listdir(where):
        listing = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated",
                                  os.path.join(where, name)], capture_output=True, text=True,
                                 check=False).stdout
        for device in listing.split():
            subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)


def sysfs(device, *parts):
    return os.path.join("/sys/block", os.path.basename(device), *parts)


# -- write-back fails ---------------------------------------------------------

def test_failed_writeback_drops_nothing_and_says_how_many_pages_were_dirty(loops):
    """A loop device over a sparse file on a 4 MiB tmpfs: 16 MiB of dirty pages
    cannot be written back.  drop must stop after the failed fdatasync: exit 5,
    one line with the dirty count, every cached page still there."""
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device = loops.attach(_image_on(mnt, 64 * MiB))
        try:
            wfd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                pattern = b"\xa5" * (16 * MiB)
                os.pwrite(wfd, pattern, 0)
                before, cached = kernel.cachestat(wfd), kernel.Reading(wfd)
                assert before["nr_dirty"] == 16 * MiB // PAGE, before
                code, out, err = cliproc.run("drop", device)
                line = cliproc.one_error_line(err)
                assert code == 5, (code, out, err)
                assert out == ""
                assert f"{device}: write-back failed: " in line
                dirty = int(re.search(r"(\d+) pages were dirty", line).group(1))
                assert 0 < dirty <= before["nr_dirty"], line
                assert "nothing was dropped" in line
                # The kernel marked them clean after EIO; they are the only copy
                # of the data and must still be cached.
                kernel.not_dropped(wfd, cached)
                assert os.pread(wfd, MiB, 15 * MiB) == pattern[:MiB]
            finally:
                os.close(wfd)
        finally:
            # Detach before the tmpfs goes (the fixture would do it too late).
            kernel.losetup("-d", device)
            loops.devices.remove(device)


def test_failed_writeback_api_raises_writeback_error(loops):
    with mounted("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as mnt:
        device = loops.attach(_image_on(mnt, 64 * MiB))
        try:
            wfd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.pwrite(wfd, b"\x5a" * (8 * MiB), 32 * MiB)
                dirty, cached = kernel.cachestat(wfd)["nr_dirty"], kernel.Reading(wfd)
                assert dirty == 8 * MiB // PAGE
                with pytest.raises(blkcache.WritebackError) as info:
                    blkcache.drop(device, method="fadvise")
                assert isinstance(info.value, OSError)
                assert info.value.errno in (errno.EIO, errno.ENOSPC)
                assert info.value.filename == device
                assert 0 < info.value.before.dirty <= dirty
                kernel.not_dropped(wfd, cached)
            finally:
                os.close(wfd)
        finally:
            kernel.losetup("-d", device)
            loops.devices.remove(device)


def _image_on(directory, size):
    path = os.path.join(directory, "image")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- the device goes away -------------------------------------------------------

def test_detach_while_held_defers_and_nothing_hangs(loops):
    """losetup -d on a held loop device only sets autoclear: blkcache keeps
    working on it until the last close, then the device is gone."""
    image = loops.image(32 * MiB)
    device = loops.attach(image)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    detached = False
    try:
        kernel.fill(fd, 0, 4 * MiB)
        kernel.losetup("-d", device)
        detached = True
        with open(sysfs(device, "loop", "autoclear")) as f:
            assert f.read().strip() == "1"
        before, (code, out, err), after = kernel.around(
            fd, lambda: cliproc.run("status", "-b", "-n", device, timeout=30))
        assert (code, err) == (0, "")
        cached = int(out.split()[1])
        kernel.between(before, cached, after)
        assert out.split()[0] == str(cached * PAGE) and cached > 0
        code, out, err = cliproc.run("drop", device, timeout=30)
        assert (code, err) == (0, "")
        assert kernel.cachestat(fd)["nr_cache"] == 0
        code, out, err = cliproc.run("verify", device, timeout=30)
        assert (code, err) == (0, ""), out
    finally:
        os.close(fd)
        # Our close was the last: the device is unbound now (and free for
        # anyone: do not touch its path again, nor let the fixture detach it).
        if detached:
            loops.devices.remove(device)
    # Gone: unbound, or (other test runs attach loop devices too) bound anew to
    # something else.  The kernel unbinds it from a work queue after the last
    # close: give it a moment.
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(sysfs(device, "loop", "backing_file")) as f:
                bound = f.read().strip()
        except FileNotFoundError:
            break
        if bound != image:
            break
        assert time.monotonic() < deadline, f"{device} still bound to {image} after 10 s"
        time.sleep(0.1)


def test_shrunk_device_keeps_stale_pages_past_its_end_and_they_count(loops):
    """A block device that shrinks (loop capacity change, volume resize) keeps
    its cached pages past the new end, and a buffered read returns them, stale,
    once it grows again.  status/verify must count them; drop must drop them."""
    image = loops.image(64 * MiB)
    with open(image, "r+b") as f:
        f.write(b"A" * (8 * MiB))
    device = loops.attach(image)
    fd = loops.hold(device)
    kernel.fill(fd, 0, 8 * MiB)
    os.truncate(image, 4 * MiB)
    kernel.losetup("-c", device)
    assert blkcache.status(device).size == 4 * MiB
    # The pages past the new end stay cached (the kernel's word).
    assert kernel.cachestat(fd, 4 * MiB, 0)["nr_cache"] > 0.9 * 4 * MiB // PAGE

    beyond, (cached, state, cached_after), beyond_after = kernel.around(
        fd, lambda: kernel.around(fd, lambda: blkcache.status(device)), 4 * MiB)
    kernel.between(cached, state.cached, cached_after)
    kernel.between(beyond, state.beyond_end, beyond_after, "beyond_end")
    # A range inside the device does not reach the end: no pages past it.
    assert blkcache.status(device, 0, MiB).beyond_end == 0
    beyond, (code, out, err), beyond_after = kernel.around(
        fd, lambda: cliproc.run("verify", device), 4 * MiB)
    assert code == 1, (out, err)
    past = int(re.search(r"(\d+) of them past the end of the device", out).group(1))
    kernel.between(beyond, past, beyond_after, "past the end")
    cached = kernel.count(fd)
    code, out, err = cliproc.run("drop", "--method", "fadvise", device)
    assert code == 0, (out, err)
    kernel.reported_before_drop(cached, int(re.search(r"(\d+) -> 0 pages cached",
                                                      out).group(1)))
    assert kernel.cachestat(fd)["nr_cache"] == 0

    # Without the drop, this is what the guest would have read after a regrow.
    with open(image, "r+b") as f:
        f.write(b"B" * (8 * MiB))
        f.truncate(64 * MiB)
    kernel.losetup("-c", device)
    assert os.pread(fd, 4, 6 * MiB) == b"BBBB"


def test_device_shrunk_to_nothing_is_not_clean_while_pages_remain(loops):
    image = loops.image(16 * MiB)
    device = loops.attach(image)
    fd = loops.hold(device)
    kernel.fill(fd, 0, 2 * MiB)
    os.truncate(image, 0)
    kernel.losetup("-c", device)
    cached, check, after = kernel.around(fd, lambda: blkcache.verify(device))
    assert check.state.size == 0
    assert check.verdict == "resident"
    kernel.between(cached, check.state.cached, after)
    cached = kernel.count(fd)
    code, out, err = cliproc.run("drop", "--json", device)
    assert (code, err) == (0, "")
    kernel.reported_before_drop(cached, json.loads(out)["devices"][0]["before"]["beyond_end"])
    assert kernel.cachestat(fd)["nr_cache"] == 0
    assert cliproc.run("verify", device)[0] == 0


# -- read-only loop device --------------------------------------------------------

@pytest.mark.parametrize("method", ["ioctl", "fadvise"])
def test_read_only_loop_device(loops, method):
    device = loops.attach(size=32 * MiB, read_only=True)
    fd = loops.hold(device)
    with open(sysfs(device, "ro")) as f:
        assert f.read().strip() == "1"
    try:
        wfd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        pass
    else:
        try:
            with pytest.raises(PermissionError):   # EPERM: the loop device is read-only
                os.pwrite(wfd, b"x", 0)
        finally:
            os.close(wfd)
    kernel.fill(fd, 0, 4 * MiB)
    cached, (code, out, err), after = kernel.around(
        fd, lambda: cliproc.run("status", "-b", "-n", device))
    assert (code, err) == (0, "")
    kernel.between(cached, int(out.split()[1]), after)
    cached = kernel.count(fd)
    code, out, err = cliproc.run("drop", "--expect-clean", "--method", method, device)
    assert (code, err) == (0, ""), out
    kernel.reported_before_drop(cached, int(re.search(r"(\d+) -> 0 pages cached",
                                                      out).group(1)))
    assert kernel.cachestat(fd)["nr_cache"] == 0
    code, out, err = cliproc.run("verify", device)
    assert (code, err) == (0, "") and "clean: 0 of 8192 pages" in out


# -- mounted file system ----------------------------------------------------------

def test_drop_on_a_mounted_ext4_reports_what_survives(loops):
    needs.need_tool("mkfs.ext4", "e2fsprogs")
    image = loops.image(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
    device = loops.attach(image)
    fd = loops.hold(device)
    with mounted(device) as mnt:
        data = os.urandom(4 * MiB)
        with open(os.path.join(mnt, "file"), "wb") as f:
            f.write(data)
        kernel.read_buffered(fd, 0, 8 * MiB)
        before = kernel.cachestat(fd)["nr_cache"]
        code, out, err = cliproc.run("drop", "--retries", "1", "--json", device)
        assert err == ""
        result = json.loads(out)["devices"][0]
        survived = kernel.cachestat(fd)["nr_cache"]
        # The file system pins its metadata buffers; the rest went.
        assert 0 < survived < before
        assert result["remaining"] >= survived       # reclaim may take more after it
        assert code == 1
        code, out, err = cliproc.run("drop", "--retries", "0", device)
        assert code == 1 and "held by a mounted file system" in out
        # The file system is fine and its data too.
        with open(os.path.join(mnt, "file"), "rb") as f:
            assert f.read() == data


# -- mapped pages -------------------------------------------------------------------

MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
offset, pages = int(sys.argv[2]), int(sys.argv[3])
m = mmap.mmap(fd, pages * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
total = sum(m[i * mmap.PAGESIZE] for i in range(pages))   # fault every page in
print("mapped", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("pages", [1, 37])
def test_mapped_pages_survive_and_are_reported_exactly(loopdev, pages):
    child = subprocess.Popen([sys.executable, "-c", MAPPER, loopdev, str(16 * MiB),
                              str(pages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "mapped"
        kernel.read_buffered(loopdev.fd, 40 * MiB, 2 * MiB)   # unmapped pages too
        for method in ("ioctl", "fadvise"):
            code, out, err = cliproc.run("drop", "--retries", "1", "--method", method,
                                         loopdev)
            assert (code, err) == (1, ""), out
            left = int(re.search(r"-> (\d+) pages cached", out).group(1))
            assert 0 < left <= pages, out             # reclaim may unmap a page, no more
            assert "pages remain" in out
            # Only the mapped pages are left, as the kernel sees it.
            now = kernel.cachestat(loopdev.fd)["nr_cache"]
            assert now <= left
            assert kernel.cachestat(loopdev.fd, 16 * MiB, pages * PAGE)["nr_cache"] == now
        result = blkcache.drop(loopdev, retries=0)
        assert 0 < result.remaining <= pages and result.complete is False
        before, (code, out, err), after = kernel.around(loopdev.fd,
                                                        lambda: cliproc.run("verify", loopdev))
        assert code == 1 and f"{loopdev}: resident: " in out
        kernel.between(before, int(out.split()[2]), after)
    finally:
        child.kill()
        child.wait()
    code, out, err = cliproc.run("drop", loopdev)
    assert code == 0 and "-> 0 pages cached" in out
