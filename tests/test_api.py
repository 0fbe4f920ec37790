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
    kernel.fill(loopdev.fd, 16 * MiB, 8 * MiB)
    raw, state, after = kernel.around(
        loopdev.fd, lambda: blkcache.status(loopdev, interface=interface))
    assert raw >= 0.9 * 8 * MiB // PAGE
    kernel.between(raw, state.cached, after)
    assert state.interface == interface
    assert state.exact is True
    assert state.size == 64 * MiB and state.kind == "block"
    assert state.pages == 64 * MiB // PAGE
    # A sub-range: exactly the 8 MiB read, nothing before it.
    high, inside, low = kernel.around(
        loopdev.fd, lambda: blkcache.status(loopdev, offset=16 * MiB, length=8 * MiB,
                                            interface=interface), 16 * MiB, 8 * MiB)
    kernel.between(high, inside.cached, low)
    assert inside.cached >= 0.9 * 8 * MiB // PAGE
    # Nothing before it: no page was read there.
    high, before, low = kernel.around(
        loopdev.fd, lambda: blkcache.status(loopdev, offset=0, length=16 * MiB,
                                            interface=interface), 0, 16 * MiB)
    kernel.between(high, before.cached, low)
    if interface == "mincore":
        assert state.dirty is None and state.writeback is None
    else:
        assert state.dirty == 0 and state.writeback == 0


@pytest.mark.parametrize("method", ["ioctl", "fadvise"])
def test_drop_empties_the_cache(loopdev, method):
    kernel.fill(loopdev.fd, 0, 32 * MiB)
    before = kernel.count(loopdev.fd)
    result = blkcache.drop(loopdev, method=method)
    assert result.method == method
    kernel.reported_before_drop(before, result.before.cached)
    assert result.after.cached == 0
    assert result.complete
    assert kernel.cached_pages(loopdev) == 0


def test_drop_auto_as_root_uses_ioctl_for_whole_device_and_fadvise_for_range(loopdev):
    fill(loopdev.fd, 16 * MiB)
    assert blkcache.drop(loopdev).method == "ioctl"
    assert kernel.cached_pages(loopdev) == 0
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(loopdev.fd, 0, 16 * MiB)
    rest = kernel.count(loopdev.fd, 8 * MiB, 8 * MiB)
    part = blkcache.drop(loopdev, offset=0, length=8 * MiB)
    assert part.method == "fadvise"
    assert part.after.cached == 0
    assert kernel.cached_pages(loopdev, 0, 8 * MiB) == 0
    # Only the range went: the rest of what was read is still cached.
    kernel.not_dropped(loopdev.fd, rest, 8 * MiB, 8 * MiB)


def test_drop_writes_dirty_pages_first(loopdev, loops):
    wfd = loops.hold(loopdev, os.O_RDWR)
    pattern = bytes(range(256)) * (4 * MiB // 256)
    os.pwrite(wfd, pattern, 4 * MiB)
    before = kernel.cachestat(wfd)
    assert before["nr_dirty"] > 0, "the test needs dirty pages to mean anything"
    result = blkcache.drop(loopdev)
    assert 0 < result.before.dirty <= before["nr_dirty"]
    assert result.after.cached == 0 and result.after.dirty == 0
    assert kernel.cachestat(wfd)["nr_cache"] == 0
    assert kernel.read_direct(loopdev, 4 * MiB, 4 * MiB) == pattern


def test_expect_clean_refuses_and_changes_nothing(loops):
    image = loops.image(64 * MiB)
    loopdev = loops.attach(image)
    fd = loops.hold(loopdev)
    wfd = loops.hold(loopdev, os.O_RDWR)
    os.pwrite(wfd, b"x" * MiB, 0)
    fill(fd, 8 * MiB, offset=8 * MiB)
    before, cached = kernel.cachestat(wfd), kernel.Reading(wfd)
    assert before["nr_dirty"] > 0
    with pytest.raises(blkcache.DirtyPagesError) as info:
        blkcache.drop(loopdev, expect_clean=True)
    assert 0 < info.value.state.dirty <= before["nr_dirty"]
    kernel.not_dropped(wfd, cached)
    # Not written: a sync would leave none dirty.
    assert kernel.cachestat(wfd)["nr_dirty"] >= before["nr_dirty"] * kernel.KEPT
    # Nothing was written back: the backing file still holds zeros there.
    # (An O_DIRECT read of the loop device itself would flush its dirty pages.)
    assert kernel.read_direct(image, 0, MiB) == bytes(MiB)


def test_expect_clean_drops_a_clean_device(loopdev):
    kernel.fill(loopdev.fd, 0, 4 * MiB)
    before = kernel.count(loopdev.fd)
    result = blkcache.drop(loopdev, expect_clean=True)
    kernel.reported_before_drop(before, result.before.cached)
    assert result.after.cached == 0
    assert kernel.cached_pages(loopdev) == 0


def test_verify_verdicts(loopdev):
    blkcache.drop(loopdev)
    assert blkcache.verify(loopdev).verdict == "clean"
    fill(loopdev.fd, MiB)
    before, check, after = kernel.around(loopdev.fd, lambda: blkcache.verify(loopdev))
    assert check.verdict == "resident"
    kernel.between(before, check.state.cached, after)


def test_regular_file_is_accepted(scratch_dir):
    path = os.path.join(scratch_dir, "image")
    with open(path, "wb") as f:
        f.write(b"a" * 4 * MiB)
        f.flush()
        os.fsync(f.fileno())
        before, state, after = kernel.around(f.fileno(), lambda: blkcache.status(path))
        assert state.kind == "file" and state.size == 4 * MiB
        kernel.between(before, state.cached, after)
        assert after > 0, "the test needs cached pages to mean anything"
        result = blkcache.drop(path)
        assert result.method == "fadvise" and result.after.cached == 0
        assert kernel.cached_pages(path) == 0
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
