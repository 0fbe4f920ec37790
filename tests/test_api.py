"""The Python API against real loop devices, checked with raw cachestat(2)."""

import errno
import os

import pytest

import blkcache
from blkcache import api

import kernel
from units import PAGE, MiB


def fill(fd, length, offset=0):
    kernel.read_buffered(fd, offset, length)


@pytest.mark.parametrize("interface", ["cachestat", "mincore"])
def test_status_counts_what_was_read(loopdev, interface):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
    fill(loopdev.fd, 8 * MiB, offset=16 * MiB)
    raw = kernel.cached_pages(loopdev)
    assert raw >= 8 * MiB // PAGE
    state = blkcache.status(loopdev, interface=interface)
    assert state.cached == raw
    assert state.interface == interface
    assert state.exact is True
    assert state.size == 64 * MiB and state.kind == "block"
    assert state.pages == 64 * MiB // PAGE
    # A sub-range: exactly the 8 MiB read, nothing before it.
    inside = blkcache.status(loopdev, offset=16 * MiB, length=8 * MiB, interface=interface)
    assert inside.cached == 8 * MiB // PAGE
    before = blkcache.status(loopdev, offset=0, length=16 * MiB, interface=interface)
    assert before.cached == kernel.cached_pages(loopdev, 0, 16 * MiB)
    if interface == "mincore":
        assert state.dirty is None and state.writeback is None
    else:
        assert state.dirty == 0 and state.writeback == 0


@pytest.mark.parametrize("method", ["ioctl", "fadvise"])
def test_drop_empties_the_cache(loopdev, method):
    fill(loopdev.fd, 32 * MiB)
    assert kernel.cached_pages(loopdev) >= 32 * MiB // PAGE
    result = blkcache.drop(loopdev, method=method)
    assert result.method == method
    assert result.before.cached >= 32 * MiB // PAGE
    assert result.after.cached == 0
    assert result.complete
    assert kernel.cached_pages(loopdev) == 0


def test_drop_auto_as_root_uses_ioctl_for_whole_device_and_fadvise_for_range(loopdev):
    fill(loopdev.fd, 16 * MiB)
    assert blkcache.drop(loopdev).method == "ioctl"
    fill(loopdev.fd, 16 * MiB)
    part = blkcache.drop(loopdev, offset=0, length=8 * MiB)
    assert part.method == "fadvise"
    assert part.after.cached == 0
    # Only the range went: the rest of what was read is still cached.
    assert kernel.cached_pages(loopdev, 8 * MiB, 8 * MiB) == 8 * MiB // PAGE


def test_drop_writes_dirty_pages_first(loopdev, loops):
    wfd = loops.hold(loopdev, os.O_RDWR)
    pattern = bytes(range(256)) * (4 * MiB // 256)
    os.pwrite(wfd, pattern, 4 * MiB)
    before = kernel.cachestat(wfd)
    assert before["nr_dirty"] > 0, "the test needs dirty pages to mean anything"
    result = blkcache.drop(loopdev)
    assert result.before.dirty == before["nr_dirty"]
    assert result.after.cached == 0 and result.after.dirty == 0
    assert kernel.read_direct(loopdev, 4 * MiB, 4 * MiB) == pattern


def test_expect_clean_refuses_and_changes_nothing(loops):
    image = loops.image(64 * MiB)
    loopdev = loops.attach(image)
    fd = loops.hold(loopdev)
    wfd = loops.hold(loopdev, os.O_RDWR)
    os.pwrite(wfd, b"x" * MiB, 0)
    fill(fd, 8 * MiB, offset=8 * MiB)
    before = kernel.cachestat(wfd)
    assert before["nr_dirty"] > 0
    with pytest.raises(blkcache.DirtyPagesError) as info:
        blkcache.drop(loopdev, expect_clean=True)
    assert info.value.state.dirty == before["nr_dirty"]
    after = kernel.cachestat(wfd)
    assert after["nr_cache"] == before["nr_cache"]
    assert after["nr_dirty"] == before["nr_dirty"]
    # Nothing was written back: the backing file still holds zeros there.
    # (An O_DIRECT read of the loop device itself would flush its dirty pages.)
    assert kernel.read_direct(image, 0, MiB) == bytes(MiB)


def test_expect_clean_drops_a_clean_device(loopdev):
    fill(loopdev.fd, 4 * MiB)
    result = blkcache.drop(loopdev, expect_clean=True)
    assert result.before.cached > 0 and result.after.cached == 0


def test_verify_verdicts(loopdev):
    blkcache.drop(loopdev)
    assert blkcache.verify(loopdev).verdict == "clean"
    fill(loopdev.fd, MiB)
    check = blkcache.verify(loopdev)
    assert check.verdict == "resident"
    assert check.state.cached == kernel.cached_pages(loopdev)


def test_regular_file_is_accepted(scratch_dir):
    path = os.path.join(scratch_dir, "image")
    with open(path, "wb") as f:
        f.write(b"a" * 4 * MiB)
        f.flush()
        os.fsync(f.fileno())
        state = blkcache.status(path)
        assert state.kind == "file" and state.size == 4 * MiB
        assert state.cached == kernel.cached_pages(path)
        result = blkcache.drop(path)
        assert result.method == "fadvise" and result.after.cached == 0
        with pytest.raises(blkcache.MethodUnavailableError):
            blkcache.drop(path, method="ioctl")


def test_range_is_widened_to_pages(loopdev):
    state = blkcache.status(loopdev, offset=PAGE + 1, length=10)
    assert (state.offset, state.length, state.pages) == (PAGE, PAGE, 1)


@pytest.mark.parametrize("offset,length,exc", [
    (64 * MiB, None, blkcache.InvalidRangeError),
    (0, 65 * MiB, blkcache.InvalidRangeError),
    (0, 0, blkcache.InvalidRangeError),
    (-1, None, blkcache.UsageError),
    ("garbage", None, blkcache.UsageError),
    (0, 2 ** 64, blkcache.UsageError),
])
def test_bad_ranges(loopdev, offset, length, exc):
    with pytest.raises(exc):
        blkcache.status(loopdev, offset=offset, length=length)


def test_bad_paths_raise_oserror_with_errno_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        blkcache.status(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "missing")
    with pytest.raises(blkcache.UnsupportedFileError, match="directory"):
        blkcache.status(tmp_path)
    with pytest.raises(blkcache.UnsupportedFileError, match="character device"):
        blkcache.status("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(blkcache.UnsupportedFileError, match="FIFO"):
        blkcache.status(fifo)


def test_dataclasses_are_frozen(loopdev):
    state = blkcache.status(loopdev)
    with pytest.raises(AttributeError):
        state.cached = 5
    assert api.CacheState.__dataclass_params__.frozen
