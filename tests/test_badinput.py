"""Hostile input on every command (CLI) and API function.

Each case: exactly one line `blkcache: ...` on stderr, its documented exit
code (man page, DIAGNOSTICS), no traceback, no hang, and nothing changed: a
held loop device with cached pages keeps every one of them (raw cachestat).
"""

import errno
import functools
import json
import os
import socket
import stat
import subprocess
import time

import pytest

import blkcache
from blkcache import api

import cliproc
import kernel
import needs
from units import MiB

COMMANDS = ("status", "drop", "verify")
FIFO_TIMEOUT = 20   # seconds: opening a FIFO must never block


def unused_block_node(directory, name):
    """A block device node with no device behind it (open gives ENXIO).

    Not the loop major: opening an unknown loop minor makes the kernel create
    that loop device.  blkext (259) hands out minors dynamically; take one far
    above any in use, or else a major no block driver registered.
    """
    with open("/proc/devices") as f:
        block = f.read().split("Block devices:")[1].split()
    majors = {int(x) for x in block if x.isdigit()}
    path = os.path.join(directory, name)
    if 259 in majors and not os.path.exists("/sys/dev/block/259:1048000"):
        dev = os.makedev(259, 1048000)
    else:
        dev = os.makedev(next(m for m in range(240, 255) if m not in majors), 7)
    os.mknod(path, stat.S_IFBLK | 0o600, dev)
    return path


def node_dir(directory, mounts):
    """A directory where device nodes work: directory itself unless its file
    system is mounted nodev (then opening any node fails with EACCES), else a
    small tmpfs mounted on a subdirectory (unmounted by the caller)."""
    if not os.statvfs(directory).f_flag & os.ST_NODEV:
        return str(directory)
    sub = os.path.join(directory, "dev")
    os.mkdir(sub)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", sub],
                   check=True)
    mounts.append(sub)
    return sub


@pytest.fixture
def held(loopdev):
    """The 64 MiB loop device with 4 MiB cached; yields a checker.

    ``unchanged()`` asserts that no drop happened: a drop empties the device,
    reclaim (and the eviction stressor, tests/evict.py) take only a few pages.
    """
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    cached = kernel.fill(loopdev.fd, 0, 4 * MiB)
    kernel.count(loopdev.fd)         # the stressor strikes between the steps

    def unchanged():
        kernel.not_dropped(loopdev.fd, cached, what="bad input dropped pages")
        kernel.count(loopdev.fd)
    loopdev.unchanged = unchanged
    return loopdev


@pytest.fixture
def paths(tmp_path, held):
    """Every kind of bad path, by name."""
    d = tmp_path
    mounts = []
    os.mkfifo(d / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fsencode(d / "socket"))
    os.symlink(d / "nowhere", d / "dangling")
    os.symlink(d / "loop", d / "loop-self")  # a symlink loop
    os.symlink(d / "loop-self", d / "loop")
    (d / "regular file").write_bytes(b"x" * 8192)
    out = {
        "nonexistent": str(d / "missing"),
        "empty": "",
        "directory": str(d),
        "devnull": "/dev/null",
        "fifo": str(d / "fifo"),
        "socket": str(d / "socket"),
        "dangling": str(d / "dangling"),
        "symlink-loop": str(d / "loop"),
        "enxio": unused_block_node(node_dir(d, mounts), "nodev"),
        "newline": str(d / "new\nline"),
        "non-utf8": os.fsdecode(os.fsencode(str(d)) + b"/\xff\xfe\x80bad"),
        "control": str(d / "esc\x1b[31mred\rcr"),
        "path-max": "/" + "/".join(["x" * 200] * 25),           # > PATH_MAX (4096)
        "name-max": str(d / ("n" * 300)),                        # > NAME_MAX (255)
        "dash": "-not-an-option",
        "file-under-file": str(d / "regular file" / "x"),        # ENOTDIR
    }
    yield out
    sock.close()
    for where in mounts:
        cliproc.umount(where)


# name -> (exit code, text the line must contain)
PATH_CASES = {
    "nonexistent": (2, "No such file or directory"),
    "empty": (2, "empty path"),
    "directory": (2, "not a block device or regular file (a directory)"),
    "devnull": (2, "not a block device or regular file (a character device)"),
    "fifo": (2, "not a block device or regular file (a FIFO)"),
    "socket": (2, "not a block device or regular file (a socket)"),
    "dangling": (2, "No such file or directory"),
    "symlink-loop": (2, "Too many levels of symbolic links"),
    "enxio": (5, "No such device or address"),
    "newline": (2, "No such file or directory"),
    "non-utf8": (2, "No such file or directory"),
    "control": (2, "No such file or directory"),
    "path-max": (2, "File name too long"),
    "name-max": (2, "File name too long"),
    "dash": (2, "No such file or directory"),
    "file-under-file": (2, "Not a directory"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_paths_cli(paths, held, command):
    names = list(PATH_CASES)
    alone = [[command, "--", paths[n]] if n == "dash" else [command, paths[n]] for n in names]
    # Bad input among good devices: nothing is done to the good ones.
    mixed = [[command, held, "--", paths[n]] for n in names]
    results = cliproc.run_many([[os.fsencode(a) for a in argv] for argv in alone + mixed],
                               timeout=FIFO_TIMEOUT)
    for name, (got, out, err), (got2, out2, err2) in zip(names, results, results[len(names):]):
        code, text = PATH_CASES[name]
        line = cliproc.one_error_line(err)
        assert (name, got) == (name, code), line
        assert text in line, (name, line)
        assert out == "", (name, out)
        # The path is in the line, escaped: control characters never reach the
        # terminal raw (the one-line check above covers newlines).
        assert "\x1b" not in line and "\r" not in line
        if name == "non-utf8":
            assert "\\xff\\xfe\\x80bad" in line
        if name == "newline":
            assert "new\\nline" in line
        assert (name, got2, out2) == (name, code, "")
        cliproc.one_error_line(err2)
    held.unchanged()


@pytest.mark.parametrize("function", [blkcache.status, blkcache.drop, blkcache.verify])
def test_bad_paths_api(paths, held, function):
    expected = {
        "nonexistent": FileNotFoundError, "empty": FileNotFoundError,
        "directory": blkcache.UnsupportedFileError, "devnull": blkcache.UnsupportedFileError,
        "fifo": blkcache.UnsupportedFileError, "socket": blkcache.UnsupportedFileError,
        "dangling": FileNotFoundError, "enxio": OSError, "newline": FileNotFoundError,
        "non-utf8": FileNotFoundError, "control": FileNotFoundError,
        "path-max": OSError, "name-max": OSError, "dash": FileNotFoundError,
        "symlink-loop": OSError, "file-under-file": NotADirectoryError,
    }
    errnos = {"enxio": errno.ENXIO, "path-max": errno.ENAMETOOLONG,
              "name-max": errno.ENAMETOOLONG, "symlink-loop": errno.ELOOP}
    assert set(expected) == set(paths)
    for name, path in paths.items():
        with pytest.raises(expected[name]) as info:
            function(path)
        if name in errnos:
            assert info.value.errno == errnos[name]
        if isinstance(info.value, OSError):
            assert info.value.filename == path
        else:
            assert info.value.path == path
        # bytes work as well as str
        with pytest.raises(expected[name]):
            function(os.fsencode(path))
    held.unchanged()


def test_symlink_to_a_device_works_and_reports_the_real_device(tmp_path, held):
    link = tmp_path / "volume link"
    os.symlink(held, link)
    chain = tmp_path / "chain"
    os.symlink(link, chain)
    for path in (str(link), str(chain)):
        before, (code, out, err), after = kernel.around(
            held.fd, functools.partial(cliproc.run, "status", "--json", path))
        assert (code, err) == (0, "")
        record = json.loads(out)["devices"][0]
        assert record["path"] == path and record["device"] == held
        kernel.between(before, record["cached"], after)
    code, out, err = cliproc.run("drop", str(chain))
    assert (code, err) == (0, "")
    assert kernel.cachestat(held.fd)["nr_cache"] == 0


def test_odd_names_of_real_devices_stay_on_one_line(tmp_path, held):
    names = ["with space", "new\nline", "tab\there", "esc\x1b[2J", b"\xff\xfe"]
    links = []
    for name in names:
        raw = os.fsencode(str(tmp_path)) + b"/" + (name if isinstance(name, bytes)
                                                   else name.encode())
        os.symlink(os.fsencode(held), raw)
        links.append(raw)
    code, out, err = cliproc.run("status", "-n", *links)
    assert (code, err) == (0, "")
    rows = out.splitlines()
    assert len(rows) == len(links), rows
    assert all("\x1b" not in row and "\t" not in row for row in rows)
    code, out, err = cliproc.run("verify", *links)
    assert code == 1 and len(out.splitlines()) == len(links)
    code, out, err = cliproc.run("status", "--json", *links)
    assert code == 0
    records = json.loads(out)["devices"]
    assert [os.fsencode(r["path"]) for r in records] == links
    assert {r["device"] for r in records} == {str(held)}
    held.unchanged()
    code, out, err = cliproc.run("drop", *links)
    assert code == 0 and len(out.splitlines()) == len(links)


# (args, exit code, text) for sizes, offsets, options; DEV is the held device.
OPTION_CASES = [
    (["--offset", "-1"], 2, "invalid offset: '-1'"),
    (["--offset=-1"], 2, "invalid offset"),
    (["--length", "-4096"], 2, "invalid length"),
    (["--offset", "garbage"], 2, "invalid offset: 'garbage'"),
    (["--offset", ""], 2, "invalid offset"),
    (["--offset", "0x1000"], 2, "invalid offset"),
    (["--offset", "1e3"], 2, "invalid offset"),
    (["--offset", "1.5"], 2, "fractions need a unit"),
    (["--offset", "12Q"], 2, "invalid offset"),
    (["--offset", "4K4K"], 2, "invalid offset"),
    (["--offset", "nan"], 2, "invalid offset"),
    (["--offset", "\u0661\u0662"], 2, "invalid offset"),             # Arabic-Indic digits
    (["--offset", str(2 ** 63)], 2, "larger than 2^63-1 bytes"),
    (["--offset", str(2 ** 64 + 1)], 2, "larger than 2^63-1 bytes"),
    (["--offset", "9" * 400], 2, "larger than 2^63-1 bytes"),
    (["--offset", "9" * 5000], 2, "larger than 2^63-1 bytes"),     # int() limit: 4300 digits
    (["--offset", "0" * 5000 + "9" * 20], 2, "larger than 2^63-1 bytes"),
    (["--length", "1." + "9" * 5000 + "K"], 2, "too many decimals"),
    (["--length", "1.0"], 2, "fractions need a unit"),
    (["--offset", "8E"], 2, "larger than 2^63-1 bytes"),
    (["--length", "16Y"], 2, "larger than 2^63-1 bytes"),
    (["--length", "0"], 2, "length must be greater than zero"),
    (["--length", "0K"], 2, "length must be greater than zero"),
    (["--offset", "64M"], 2, "offset 67108864 is beyond the end of the device (67108864 bytes)"),
    (["--offset", "64M", "--length", "1"], 2, "beyond the end of the device"),
    (["--offset", str(2 ** 63 - 1)], 2, "beyond the end of the device"),
    (["--offset", "4T"], 2, "beyond the end of the device"),
    (["--length", "65M"], 2, "range 0+68157440 ends beyond the end of the device"),
    (["--offset", "4096", "--length", "64M"], 2, "ends beyond the end of the device"),
    (["--offset", str(64 * MiB - 1), "--length", "2"], 2, "ends beyond the end"),
    (["--offset", "1", "--length", str(2 ** 63 - 1)], 2, "ends beyond the end"),
    (["--length", str(2 ** 63 - 1)], 2, "ends beyond the end"),
    (["--interface", "bogus"], 2, "Invalid value for '--interface'"),
    (["--bogus"], 2, "No such option '--bogus'"),
    (["-Z"], 2, "No such option '-Z'"),
    (["--offset"], 2, "requires an argument"),
]
DROP_CASES = [
    (["--method", "bogus"], 2, "Invalid value for '--method'"),
    (["--retries", "-1"], 2, "Invalid value for '--retries'"),
    (["--retries", "21"], 2, "Invalid value for '--retries'"),
    (["--retries", "x"], 2, "Invalid value for '--retries'"),
    (["--method", "ioctl", "--offset", "4096"], 5,
     "BLKFLSBUF drops the whole device, not a range (fix: drop a range with --method fadvise)"),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_sizes_offsets_and_options(held, command):
    cases = OPTION_CASES + (DROP_CASES if command == "drop" else [])
    results = cliproc.run_many([[command, held, *args] for args, _, _ in cases])
    for (args, code, text), (got, out, err) in zip(cases, results):
        line = cliproc.one_error_line(err)
        assert got == code, (args, line)
        assert text in line, (args, line)
        assert out == "", (args, out)
    held.unchanged()


def test_long_zero_padded_sizes_are_fine(held):
    state = blkcache.status(held, offset="0" * 5000 + "4096", length="0" * 300 + "1.50K")
    assert (state.offset, state.length) == (4096, 4096)


def test_usage_errors_without_devices():
    for args, text in [([], "Usage"), (["bogus"], "No such command 'bogus'"),
                       (["status"], "Missing argument 'DEVICE...'"),
                       (["drop"], "Missing argument 'DEVICE...'"),
                       (["verify", "--json"], "Missing argument 'DEVICE...'"),
                       (["--bogus"], "No such option '--bogus'")]:
        code, out, err = cliproc.run(*args)
        if not args:     # bare `blkcache` prints its help (click's choice), exit 2
            assert code in (0, 2) and "Usage" in out + err
            continue
        line = cliproc.one_error_line(err)
        assert code == 2 and text in line, (args, line)


def test_regular_file_where_a_device_is_required(tmp_path, held):
    image = tmp_path / "image"
    image.write_bytes(b"i" * (2 * MiB))
    code, out, err = cliproc.run("drop", "--method", "ioctl", str(image))
    line = cliproc.one_error_line(err)
    assert code == 5
    assert line == (f"blkcache: {image}: BLKFLSBUF works on block devices only "
                    "(fix: use --method fadvise)")
    # Several targets, one of which cannot take the method: 64, some failed.
    code, out, err = cliproc.run("drop", "--method", "ioctl", str(held), str(image))
    assert code == 64
    cliproc.one_error_line(err)
    with pytest.raises(blkcache.MethodUnavailableError):
        blkcache.drop(image, method="ioctl")
    # Accepted as an image otherwise.
    assert cliproc.run("status", str(image))[0] == 0


def test_too_many_devices(held):
    code, out, err = cliproc.run("status", "-n", *[held] * api.MAX_TARGETS)
    assert (code, err) == (0, "")
    assert len(out.splitlines()) == api.MAX_TARGETS
    for command in COMMANDS:
        code, out, err = cliproc.run(command, *[held] * (api.MAX_TARGETS + 1))
        line = cliproc.one_error_line(err)
        assert code == 2 and out == ""
        assert line == f"blkcache: too many devices: {api.MAX_TARGETS + 1} (at most 256)"
        held.unchanged()
    import contextlib
    with contextlib.ExitStack() as stack, pytest.raises(blkcache.UsageError):
        api.open_targets([held] * (api.MAX_TARGETS + 1), stack)


@pytest.mark.parametrize("offset,length,exc", [
    (-1, None, blkcache.UsageError),
    (None, None, blkcache.UsageError),
    (True, None, blkcache.UsageError),
    (1.5, None, blkcache.UsageError),
    (float("nan"), None, blkcache.UsageError),
    (b"4096", None, blkcache.UsageError),
    (2 ** 63, None, blkcache.UsageError),
    (2 ** 64, None, blkcache.UsageError),
    (10 ** 400, None, blkcache.UsageError),
    ("9" * 5000, None, blkcache.UsageError),
    ("1." + "5" * 5000 + "M", None, blkcache.UsageError),
    (0, -1, blkcache.UsageError),
    (0, 0, blkcache.InvalidRangeError),
    (64 * MiB, None, blkcache.InvalidRangeError),
    (2 ** 63 - 1, 1, blkcache.InvalidRangeError),
    (0, 2 ** 63 - 1, blkcache.InvalidRangeError),
    (4096, 64 * MiB, blkcache.InvalidRangeError),
])
def test_bad_ranges_api(held, offset, length, exc):
    for function in (blkcache.status, blkcache.drop, blkcache.verify):
        with pytest.raises(exc):
            function(held, offset=offset, length=length)
    for kwargs in ({"interface": "bogus"}, {"method": "bogus"}):
        with pytest.raises(ValueError):
            blkcache.drop(held, **kwargs)
    held.unchanged()


FIFO_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)     # blocks until some reader opens the FIFO
print("released", flush=True)
"""


def test_refused_paths_are_never_opened(tmp_path):
    """A refused path is not even opened: opening the read end of a FIFO would
    release a writer blocked in open(2) and then break its pipe (and opening a
    character device can arm a watchdog, rewind a tape, reset a serial line)."""
    import subprocess
    import sys

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", FIFO_WRITER, str(fifo)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for command in COMMANDS:
            code, out, err = cliproc.run(command, str(fifo), timeout=FIFO_TIMEOUT)
            assert code == 2 and "(a FIFO)" in cliproc.one_error_line(err)
        with pytest.raises(blkcache.UnsupportedFileError):
            blkcache.status(fifo)
        time.sleep(0.3)
        assert writer.poll() is None, "the FIFO was opened: its writer got released"
    finally:
        writer.kill()
        writer.wait()


def _run_to(stdout, *args):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "blkcache", *args], stdout=stdout,
                            stderr=subprocess.PIPE, env=cliproc.env())
    if stdout == subprocess.PIPE:
        proc.stdout.close()          # the reader goes away at once (`| head -c0`)
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err


def test_output_that_cannot_be_written(held):
    """A reader that goes away keeps the verdict; a full disk is a failure, said
    once; neither is a traceback nor a device error."""
    import subprocess

    for args, code in ((["verify", held], 1), (["status", held], 0),
                       (["status", "--json", *[held] * 200], 0), (["drop", held, held], 0)):
        got, err = _run_to(subprocess.PIPE, *args)
        assert (got, err) == (code, ""), (args, err)
        kernel.read_buffered(held.fd, 0, 4 * MiB)
    with open("/dev/full", "w") as full:
        for args in (["verify", held], ["status", "--json", held], ["drop", held]):
            got, err = _run_to(full, *args)
            assert got == 5, (args, err)
            assert cliproc.one_error_line(err) == \
                "blkcache: cannot write output: No space left on device"
            kernel.read_buffered(held.fd, 0, 4 * MiB)
        # stderr full too: still the right exit status, and no hang.
        import sys
        proc = subprocess.run([sys.executable, "-m", "blkcache", "status", "/nonexistent"],
                              stdout=full, stderr=full, env=cliproc.env(), timeout=60)
        assert proc.returncode == 2


def test_demo_bad_sizes(loop_available):
    for size, text in (("0", "demo volume size must be at least 4096 bytes"),
                       ("4095", "demo volume size must be at least 4096 bytes"),
                       ("garbage", "invalid size: 'garbage'"), ("-1", "invalid size"),
                       ("8E", "larger than 2^63-1 bytes")):
        code, out, err = cliproc.run("demo", "--size", size)
        line = cliproc.one_error_line(err)
        assert code == 2 and text in line, (size, line)
        assert out == ""


def test_out_of_file_descriptors(held):
    """More devices than the fd limit allows: one line, exit 5, nothing done."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    for command in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "blkcache", command, *[held] * 40],
                              capture_output=True, text=True, env=cliproc.env(),
                              preexec_fn=limit, timeout=60)
        line = cliproc.one_error_line(proc.stderr)
        assert proc.returncode == 5 and "Too many open files" in line, line
        assert proc.stdout == ""
        held.unchanged()


def test_without_proc_the_type_check_still_holds(held, tmp_path):
    """Without /proc (no reopen through /proc/self/fd) blkcache reopens the
    path and requires the same inode; refused paths are still never opened."""
    import subprocess
    import sys

    needs.need_tool("unshare", "util-linux")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = ('umount -l /proc && test ! -e /proc/self && '
              f'"{sys.executable}" -m blkcache status -b -n "$1"; echo "rc=$?"; '
              f'"{sys.executable}" -m blkcache verify "$2"; echo "rc=$?"')

    def unshared():
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script, "sh", held, str(fifo)], capture_output=True,
                              text=True, env=cliproc.env(), timeout=60)
    before, proc, after = kernel.around(held.fd, unshared)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "rc=2" and lines[-2] == "rc=0", (proc.stdout, proc.stderr)
    kernel.between(before, int(lines[0].split()[1]), after)
    assert "(a FIFO)" in cliproc.one_error_line(proc.stderr)
    held.unchanged()


def test_api_rejects_a_nul_byte(held):
    for function in (blkcache.status, blkcache.drop, blkcache.verify):
        with pytest.raises(ValueError):
            function(held + "\0x")
    held.unchanged()
