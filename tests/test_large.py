"""Large devices: a 1 TiB sparse loop device, and 4 and 8 EiB ones.

A sparse file of 2^63-4096 bytes fits on a 16 MiB tmpfs, and a loop device
over it is a real 8 EiB block device with 2^51 pages: offsets and lengths
near 2^63 go through the whole stack (CLI, API, cffi, cachestat, mincore,
posix_fadvise, BLKFLSBUF).  Page counts above 2^32 are real there for the
size of a range; a count of *cached* pages above 2^32 would need 16 TiB of
memory, so for those the test checks that every count is 64-bit in the C
layer (struct fields and arguments are uint64_t, checked through cffi).
"""

import contextlib
import errno
import functools
import json
import os
import subprocess
import tempfile
import time

import pytest

import blkcache
from blkcache import api
from blkcache._native import ffi, lib

import cliproc
import kernel
from units import PAGE, MiB, TiB

MAX = 2 ** 63 - 1


def read_page(fd, offset):
    data = os.pread(fd, PAGE, offset)
    assert data, offset
    return data


@pytest.fixture
def tib_device(loops):
    """A held 1 TiB loop device over a sparse file on disk, nothing cached."""
    image = loops.image(TiB)
    device = loops.attach(image)
    fd = loops.hold(device)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    device = type("Dev", (str,), {})(device)
    device.fd = fd
    return device


def test_one_tib_device_offsets_near_2_40(tib_device):
    dev, fd = tib_device, tib_device.fd
    for offset in (0, TiB - MiB, TiB - PAGE):
        read_page(fd, offset)
    kernel.fill(fd, 1 << 39, 64 * PAGE)      # enough pages to tell a drop apart

    started = time.monotonic()
    cached, (code, out, err), after = kernel.around(fd, lambda: cliproc.run("status", "--json",
                                                                            dev))
    assert cached >= 64
    assert (code, err) == (0, "")
    state = json.loads(out)["devices"][0]
    assert state["size"] == TiB and state["pages"] == TiB // PAGE
    kernel.between(cached, state["cached"], after)
    assert state["interface"] == "cachestat"
    assert time.monotonic() - started < 5          # cachestat: cost of cached pages

    # The last page, from a moment the kernel had it cached (else read it again).
    for offset, length in ((TiB - PAGE, PAGE), (TiB - 1, 1)):
        top = kernel.steady(fd, 1, lambda: read_page(fd, TiB - PAGE),
                            functools.partial(blkcache.status, dev, offset, length),
                            TiB - PAGE, PAGE)
        assert top.cached == 1
    high, last_gib, low = kernel.around(
        fd, lambda: blkcache.status(dev, TiB - (1 << 30), interface="mincore"),
        TiB - (1 << 30), 1 << 30)
    kernel.between(high, last_gib.cached, low)
    assert last_gib.pages == (1 << 30) // PAGE
    for args in (["--offset", str(TiB)], ["--offset", str(TiB + PAGE)],
                 ["--length", str(TiB + 1)], ["--offset", str(TiB - PAGE), "--length", "8K"],
                 ["--offset", str(TiB - 1), "--length", "2"], ["--offset", str(MAX)],
                 ["--length", str(MAX)]):
        code, out, err = cliproc.run("verify", *args, dev)
        assert code == 2 and "beyond the end of the device (1099511627776 bytes)" in err, err

    # Drop the last MiB only: the pages at 2^39 stay.
    kept = kernel.fill(fd, 1 << 39, 64 * PAGE)
    code, out, err = cliproc.run("drop", "--offset", str(TiB - MiB), dev)
    assert (code, err) == (0, ""), out
    assert kernel.cachestat(fd, TiB - MiB, MiB)["nr_cache"] == 0
    kernel.not_dropped(fd, kept, 1 << 39, 64 * PAGE)
    code, out, err = cliproc.run("drop", "--method", "fadvise", dev)
    assert (code, err) == (0, "") and kernel.cachestat(fd)["nr_cache"] == 0


@contextlib.contextmanager
def exabyte_device(loops, size):
    """A held loop device of ``size`` bytes over a sparse file on a small tmpfs."""
    mnt = tempfile.mkdtemp(prefix="blkcache-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", mnt],
                   check=True)
    try:
        image = os.path.join(mnt, "image")
        with open(image, "wb") as f:
            f.truncate(size)
        device = loops.attach(image)
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                yield device, fd
            finally:
                os.close(fd)
        finally:
            kernel.losetup("-d", device)
            loops.devices.remove(device)
    finally:
        cliproc.umount(mnt)
        os.rmdir(mnt)


@pytest.mark.parametrize("size", [2 ** 62, 2 ** 63 - PAGE, 2 ** 63 - 512])
def test_exabyte_devices_offsets_near_2_63(loops, size):
    with exabyte_device(loops, size) as (dev, fd):
        pages = -(-size // PAGE)
        assert pages > 2 ** 32
        read_page(fd, size - PAGE)
        kernel.fill(fd, 1 << 40, 64 * PAGE)      # enough pages to tell a drop apart
        assert kernel.cachestat(fd, size - 1, 1)["nr_cache"] == 1

        cached, (code, out, err), after = kernel.around(
            fd, lambda: cliproc.run("status", "--json", dev))
        assert (code, err) == (0, ""), err
        state = json.loads(out)["devices"][0]
        assert (state["size"], state["pages"]) == (size, pages)
        kernel.between(cached, state["cached"], after)
        assert state["offset"] + state["length"] <= MAX
        cached, (code, out, err), after = kernel.around(fd, lambda: cliproc.run("verify", dev))
        assert code == 1 and f" of {pages} pages" in out, (out, err)
        kernel.between(cached, int(out.split()[2]), after)

        # The top of the device, through both interfaces.
        for interface in ("cachestat", "mincore"):
            if interface == "mincore" and size % PAGE:
                # Its last page crosses 2^63-1: mmap cannot map it (off_t), so
                # mincore cannot see it.  A clean EOVERFLOW, no wrong count.
                with pytest.raises(OSError) as info:
                    blkcache.status(dev, offset=size - 1, length=1, interface=interface)
                assert info.value.errno == errno.EOVERFLOW
                continue
            top = kernel.steady(
                fd, 1, lambda: read_page(fd, size - PAGE),
                functools.partial(blkcache.status, dev, offset=size - 1, length=1,
                                  interface=interface),
                size - 1, 1)
            assert top.offset == (size - 1) // PAGE * PAGE and top.pages == 1
            assert top.cached == 1, interface
            high, near, low = kernel.around(
                fd, functools.partial(blkcache.status, dev, offset=size - 64 * MiB,
                                      interface=interface),
                size - 64 * MiB)
            kernel.between(high, near.cached, low)
        for args in (["--offset", str(size)], ["--offset", str(MAX)],
                     ["--offset", str(size - 1), "--length", "2"], ["--length", str(MAX)]
                     if size < MAX else ["--length", str(size + 1)]):
            code, out, err = cliproc.run("status", *args, dev)
            assert code == 2 and "beyond the end of the device" in err, (args, err)

        # Drop the top page only, then everything.
        kept = kernel.fill(fd, 1 << 40, 64 * PAGE)
        code, out, err = cliproc.run("drop", "--method", "fadvise", "--offset", str(size - 1),
                                     dev)
        assert (code, err) == (0, ""), out
        assert kernel.cachestat(fd, size - 1, 1)["nr_cache"] == 0
        kernel.not_dropped(fd, kept, 1 << 40, 64 * PAGE)
        for method in ("ioctl", "fadvise"):
            read_page(fd, size - PAGE)
            result = blkcache.drop(dev, method=method)
            assert result.after.cached == 0 and result.before.pages == pages
            assert kernel.cachestat(fd)["nr_cache"] == 0


def test_range_arithmetic_at_the_top(loops):
    """Target.range on a real 2^63-512-byte device: never past 2^63-1, never wrong."""
    size = 2 ** 63 - 512
    with exabyte_device(loops, size) as (dev, _fd), api.Target(dev) as target:
        assert target.size == size
        cases = [(0, None), (size - 1, 1), (size - 1, None), (size - PAGE, PAGE),
                 (size - PAGE - 1, PAGE + 1), (2 ** 62 + 1, 2 ** 62 - 1024), (1, size - 1),
                 (0, size), (size // 2, size - size // 2), (PAGE * 2 ** 32, PAGE * 2 ** 32)]
        for offset, length in cases:
            rng = target.range(offset, length)
            want_end = offset + (size - offset if length is None else length)
            assert rng.offset == offset // PAGE * PAGE
            assert rng.offset + rng.length >= want_end
            assert rng.offset + rng.length <= MAX
            assert rng.length - (want_end - rng.offset) < PAGE
            assert rng.pages == -(-(want_end - rng.offset) // PAGE)
        for offset, length in [(size, None), (size - 1, 2), (0, size + 1), (MAX, 1),
                               (2 ** 63, None), (0, 2 ** 64)]:
            with pytest.raises(ValueError):
                target.range(offset, length)


def test_native_counts_and_ranges_are_64_bit():
    st = ffi.typeof("struct blkcache_stat")
    uint64 = ffi.typeof("uint64_t")
    for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted"):
        assert dict(st.fields)[name].type is uint64, name
    for func, params in [(lib.blkcache_cachestat, (1, 2)), (lib.blkcache_drop_range, (1, 2)),
                         (lib.blkcache_mincore, (1, 2, 3)), (lib.blkcache_cache_stat, (1, 2, 4)),
                         (lib.blkcache_device_size, ())]:
        args = ffi.typeof(func).args
        for i in params:
            assert args[i] is uint64, (func, i)
    assert ffi.typeof(lib.blkcache_device_size).args[1] is ffi.typeof("uint64_t *")
    # A count above 2^32 survives the trip through the struct unchanged.
    cell = ffi.new("struct blkcache_stat *")
    cell.nr_cache = 2 ** 51 + 3
    cell.nr_dirty = 2 ** 64 - 1
    assert (cell.nr_cache, cell.nr_dirty) == (2 ** 51 + 3, 2 ** 64 - 1)
