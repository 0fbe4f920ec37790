"""Several devices: one bad input changes nothing and never tracebacks; an
answer that could not be delivered is never a success (issue 10, point 4).

"Nothing was dropped" is shown by a margin: a drop removes (nearly) every
page, reclaim takes a few percent per minute at most.
"""

import os
import subprocess
import sys

import pytest

from blkcache import exitcodes

import cliproc
import kernel

MiB = 1 << 20


def _cache(loops, device, mib):
    fd = loops.hold(device)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fd, 0, mib * MiB)
    pages = kernel.cachestat(fd)["nr_cache"]
    assert pages > mib * MiB // kernel.PAGE // 2
    return fd, pages


@pytest.fixture
def small_big(loops):
    """A 4 KiB and a 64 MiB loop device, the big one with 4 MiB cached."""
    small = loops.attach(size=4096)
    big = loops.attach(size=64 * MiB)
    loops.hold(small)
    fd, pages = _cache(loops, big, 4)
    return small, big, fd, pages


@pytest.mark.parametrize("command", ["status", "verify", "drop"])
@pytest.mark.parametrize("order", ["small first", "big first"])
def test_a_range_past_the_end_of_one_device_stops_all(small_big, command, order):
    small, big, fd, before = small_big
    devices = [small, big] if order == "small first" else [big, small]
    code, out, err = cliproc.run(command, "--offset", "8K", *devices)
    line = cliproc.one_error_line(err)
    assert (code, out) == (2, "")
    assert line == (f"blkcache: {small}: offset 8192 is beyond the end of the device "
                    "(4096 bytes)")
    # A drop of the big device would have left (nearly) nothing.
    assert kernel.cachestat(fd)["nr_cache"] > before // 2
    # The API call behind the command refuses the same way, before opening more.
    import contextlib

    from blkcache import api
    from blkcache.errors import InvalidRangeError

    with contextlib.ExitStack() as stack, pytest.raises(InvalidRangeError) as info:
        api.open_targets(devices, stack, offset="8K")
    assert info.value.path == small


def test_recursive_expansion_to_a_smaller_partition_stops_all(partitioned, loops):
    """-r adds the partitions; the 8 MiB p2 cannot hold 12 MiB + 1 MiB: nothing is
    dropped, neither the disk nor p1."""
    disk, p1, p2 = partitioned
    fds = {dev: _cache(loops, dev, 2) for dev in (disk, p1)}
    code, out, err = cliproc.run("drop", "-r", "--offset", "12M", "--length", "1M", disk)
    line = cliproc.one_error_line(err)
    assert (code, out) == (2, "")
    assert line == (f"blkcache: {p2}: offset 12582912 is beyond the end of the device "
                    f"({8 * MiB} bytes)")
    for fd, before in fds.values():
        assert kernel.cachestat(fd)["nr_cache"] > before // 2
    code, out, err = cliproc.run("status", "-r", "--offset", "12M", "--length", "1M", disk)
    assert (code, out) == (2, "") and cliproc.one_error_line(err) == line


def test_combined_exit_codes_take_every_code():
    combine = exitcodes.combine
    assert combine([exitcodes.USAGE, exitcodes.OK]) == exitcodes.USAGE
    assert combine([exitcodes.RESIDENT, exitcodes.USAGE, exitcodes.DIRTY]) == exitcodes.USAGE
    assert combine([exitcodes.USAGE, exitcodes.FAILURE]) == exitcodes.SOME_FAILED
    assert combine([exitcodes.OK, exitcodes.INTERRUPTED]) == exitcodes.INTERRUPTED
    assert combine([exitcodes.UNKNOWN, exitcodes.RESIDENT, exitcodes.OK]) == \
        exitcodes.UNKNOWN


@pytest.mark.parametrize("argument", [123, None, 1.5, ["/dev/null"]])
def test_a_wrong_argument_type_is_a_clean_type_error(argument):
    code = ("import blkcache\n"
            "try:\n"
            f"    blkcache.status({argument!r})\n"
            "except TypeError as exc:\n"
            "    print('TypeError', exc)\n"
            "import gc; gc.collect()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cliproc.env(), timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("TypeError ")
    assert proc.stderr == ""


def _closed_stdout(*args):
    """blkcache ARGS with standard output closed (`>&-`)."""
    proc = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m",
                           "blkcache", *args], capture_output=True, text=True,
                          env=cliproc.env(), timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


LOST = "blkcache: cannot write output: standard output is closed"


def test_an_answer_that_cannot_be_delivered_is_not_a_success(loops, scratch_dir):
    device = loops.attach(size=16 * MiB)
    fd, before = _cache(loops, device, 2)
    image = os.path.join(scratch_dir, "image")
    with open(image, "wb") as f:
        f.truncate(MiB)
    for args in (["status", device], ["status", "-J", device], ["verify", device],
                 ["verify", "-J", device], ["doctor"], ["doctor", "-J"], ["failures"],
                 ["failures", "-J"], ["watch", "--count", "1", device],
                 ["verify", "--coherence", image], ["hook", "libvirt"], ["--help"],
                 ["status", "--help"], ["--version"], ["drop", image],
                 ["drop", "-J", image]):
        code, err = _closed_stdout(*args)
        assert (code, err.splitlines()) == (5, [LOST]), args
    # The answer of drop -q is its exit status alone: nothing was lost.
    assert _closed_stdout("drop", "-q", device) == (0, "")
    assert kernel.cachestat(fd)["nr_cache"] == 0
    # verify's "resident" (1) is no success either, but it was not delivered: 5.
    kernel.read_buffered(fd, 0, MiB)
    assert _closed_stdout("verify", device) == (5, LOST + "\n")
    # An error needs no standard output: its own code.
    assert _closed_stdout("status", os.path.join(scratch_dir, "gone"))[0] == 2
