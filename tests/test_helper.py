"""The setcap helper blkcache-flush, run as nobody against real loop devices.

Page counts come from the raw cachestat(2) oracle in kernel.py, as root.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from blkcache import privilege

import kernel
import needs
from unprivileged import cached_loop, node_mode

USAGE = "blkcache-flush: usage: blkcache-flush DEVICE | fd:N (exactly one argument)\n"


def one_line(proc):
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blkcache-flush: ")
    return lines[0]


# -- the binary as built ---------------------------------------------------------

def readelf(*args):
    needs.need_tool("readelf", "binutils")
    return subprocess.run(["readelf", "-W", *args, privilege.helper_path()], check=True,
                          capture_output=True, text=True).stdout


def test_helper_is_installed_with_the_package_and_without_capability():
    path = privilege.helper_path()
    assert os.path.basename(path) == "blkcache-flush"
    assert os.access(path, os.X_OK), f"{path} was not built or is not executable"
    # setup.py never grants the capability: an administrator does.
    assert privilege.file_caps(path) is None


def test_helper_is_hardened():
    header = readelf("-h")
    assert re.search(r"Type:\s+DYN", header)                      # PIE
    segments = readelf("-l")
    assert "GNU_RELRO" in segments
    stack = re.search(r"GNU_STACK(.*)", segments).group(1)
    assert stack.split()[-2] == "RW", stack                        # not executable
    dynamic = readelf("-d")
    assert "BIND_NOW" in dynamic or re.search(r"FLAGS_1.*\bNOW\b", dynamic)  # full RELRO
    assert re.search(r"FLAGS_1.*\bPIE\b", dynamic)
    symbols = readelf("--dyn-syms")
    assert "__stack_chk_fail" in symbols                           # stack protector
    assert re.search(r"__\w+_chk\b", symbols.replace("__stack_chk_fail", ""))  # FORTIFY
    for forbidden in ("getenv", "secure_getenv", "execve", "execv", "system", "popen",
                      "fopen"):
        assert not re.search(rf"\b{forbidden}\b", symbols), forbidden


# -- flushing ------------------------------------------------------------------

def test_flushes_a_node_the_user_can_read(granted, loopdev):
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        proc = granted.run(granted.helper, loopdev)
        assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")
        assert before > 0
        assert kernel.cached_pages(loopdev) == 0


def test_flushes_an_fd_the_user_opened(granted, loopdev):
    with node_mode(loopdev, 0o644):
        cached_loop(loopdev)
        # The shell opens the node as nobody and hands the fd down.
        proc = granted.run("sh", "-c", 'exec "$0" fd:7 7<"$1"', granted.helper, loopdev)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert kernel.cached_pages(loopdev) == 0


def test_refuses_a_node_the_user_cannot_open(granted, loopdev):
    with node_mode(loopdev, 0o600):
        before = cached_loop(loopdev)
        proc = granted.run(granted.helper, loopdev)
        assert proc.returncode == 1
        assert one_line(proc) == f"blkcache-flush: {loopdev}: cannot open: Permission denied"
        kernel.not_dropped(loopdev.fd, before)


def test_refuses_an_o_path_fd_to_a_node_the_user_cannot_open(granted, loopdev):
    with node_mode(loopdev, 0o600):
        before = cached_loop(loopdev)
        code = ("import os, subprocess, sys\n"
                "fd = os.open(sys.argv[2], os.O_PATH)\n"
                "p = subprocess.run([sys.argv[1], 'fd:%d' % fd], pass_fds=[fd])\n"
                "sys.exit(p.returncode)\n")
        proc = granted.py(code, granted.helper, loopdev)
        assert proc.returncode == 2, proc.stderr
        assert one_line(proc).endswith(": an O_PATH descriptor grants no access")
        kernel.not_dropped(loopdev.fd, before)


def test_without_the_capability_nothing_is_flushed(nobody, loopdev):
    nobody.revoke()
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        proc = nobody.run(nobody.helper, loopdev)
        assert proc.returncode == 1
        assert one_line(proc) == (
            f"blkcache-flush: {loopdev}: CAP_SYS_ADMIN is not permitted to this program "
            "(an administrator grants it with setcap cap_sys_admin+p): "
            "Operation not permitted")
        kernel.not_dropped(loopdev.fd, before)


# -- refusals --------------------------------------------------------------------

@pytest.fixture
def odd_files(granted):
    """A regular file, a directory and a FIFO nobody can open, in the copy's dir."""
    base = os.path.join(granted.root, "odd")
    os.mkdir(base, 0o755)
    regular = os.path.join(base, "regular")
    with open(regular, "wb") as f:
        f.write(b"x" * 4096)
    os.chmod(regular, 0o644)
    fifo = os.path.join(base, "fifo")
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    yield {"regular": regular, "directory": base, "chardev": "/dev/null", "fifo": fifo}
    shutil.rmtree(base)


@pytest.mark.parametrize("kind", ["regular", "directory", "chardev", "fifo"])
def test_refuses_what_is_not_a_block_device(granted, odd_files, kind):
    path = odd_files[kind]
    proc = granted.run(granted.helper, path, timeout=10)  # a FIFO must not hang
    assert proc.returncode == 2
    assert one_line(proc) == f"blkcache-flush: {path}: not a block device"


@pytest.mark.parametrize("kind", ["regular", "chardev", "fifo"])
def test_refuses_an_fd_that_is_not_a_block_device(granted, odd_files, kind):
    path = odd_files[kind]
    redirect = "<>" if kind == "fifo" else "<"   # O_RDWR: opening a FIFO won't block
    proc = granted.run("sh", "-c", f'exec "$0" fd:5 5{redirect}"$1"', granted.helper, path,
                       timeout=10)
    assert proc.returncode == 2
    assert one_line(proc) == "blkcache-flush: fd:5: not a block device"


def test_refuses_a_missing_path(granted):
    proc = granted.run(granted.helper, "/dev/blkcache-no-such-device")
    assert proc.returncode == 2
    assert one_line(proc) == ("blkcache-flush: /dev/blkcache-no-such-device: cannot open: "
                              "No such file or directory")


@pytest.mark.parametrize("argv", [[], ["/dev/null", "/dev/null"], [""], ["-h"],
                                  ["--", "/dev/null"]])
def test_usage(granted, argv):
    proc = granted.run(granted.helper, *argv)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, USAGE, "")


@pytest.mark.parametrize("spec", ["fd:", "fd:-1", "fd:+7", "fd: 7", "fd:7 ", "fd:7x",
                                  "fd:0x7", "fd:07", "fd:2147483648",
                                  "fd:99999999999999999999999"])
def test_refuses_malformed_fd_numbers(granted, spec):
    proc = granted.run(granted.helper, spec)
    assert proc.returncode == 2
    assert one_line(proc) == f"blkcache-flush: {spec}: not a file descriptor number"


@pytest.mark.parametrize("spec", ["fd:9", "fd:1023", "fd:2147483647"])
def test_refuses_fd_numbers_not_open(granted, spec):
    proc = granted.run(granted.helper, spec)
    assert proc.returncode == 2
    assert one_line(proc) == (f"blkcache-flush: {spec}: not an open file descriptor: "
                              "Bad file descriptor")


def test_escapes_control_characters_in_messages(granted):
    proc = granted.run(granted.helper, "/dev/no\x1b[31mdevice")
    assert proc.returncode == 2
    assert "\x1b" not in proc.stderr
    assert one_line(proc).startswith("blkcache-flush: /dev/no\\x1b[31mdevice: cannot open")


def test_escapes_bytes_above_ascii_in_messages(granted):
    """0x9b is a one-byte CSI on terminals that take C1 controls; UTF-8 is escaped too."""
    proc = granted.run(granted.helper, b"/dev/caf\xc3\xa9\x9b[2J", errors="surrogateescape")
    assert proc.returncode == 2
    assert proc.stderr.isascii(), proc.stderr
    assert one_line(proc) == ("blkcache-flush: /dev/caf\\xc3\\xa9\\x9b[2J: cannot open: "
                              "No such file or directory")


def test_opens_no_fifo_by_path(granted, odd_files):
    """A writer blocked opening a FIFO stays blocked: the helper looks at the
    type through an O_PATH fd and never opens what is not a block device."""
    fifo = odd_files["fifo"]
    writer = subprocess.Popen([sys.executable, "-c",
                               "import os, sys; os.open(sys.argv[1], os.O_WRONLY); "
                               "print('released', flush=True)", fifo],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        assert writer.poll() is None, "the writer did not block"
        proc = granted.run(granted.helper, fifo, timeout=10)
        assert proc.returncode == 2
        assert one_line(proc) == f"blkcache-flush: {fifo}: not a block device"
        time.sleep(0.3)
        assert writer.poll() is None, "the helper opened the FIFO and released its writer"
    finally:
        # Release the writer ourselves (a reader that does not block), then reap it.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            writer.wait(timeout=10)
        finally:
            os.close(fd)
            writer.stdout.close()


# -- capabilities only around the ioctl --------------------------------------------

SYSCALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")


def test_capability_is_effective_only_around_the_ioctl(granted, loopdev, scratch_dir):
    needs.need_tool("strace", "strace")
    out = os.path.join(scratch_dir, "strace.out")
    with node_mode(loopdev, 0o644):
        cached_loop(loopdev)
        # strace runs as root (it may trace a capability-raising exec); the
        # helper runs as nobody under setpriv.
        proc = subprocess.run(
            ["strace", "-f", "-qq", "-s", "256", "-o", out, "--",
             "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "--inh-caps=-all", "--", granted.helper, loopdev],
            env=granted.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert kernel.cached_pages(loopdev) == 0
    with open(out, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if re.search(rf'execve\("{re.escape(granted.helper)}"', line))
    calls = []
    for line in lines[start + 1:]:
        match = SYSCALL.match(line)
        if match:
            calls.append((match.group(2), match.group(3)))
    names = [name for name, _ in calls]
    text = "\n".join(f"{n}({a}" for n, a in calls)
    # The file capability is permitted only: nothing effective at start.
    capget = [args for name, args in calls if name == "capget"]
    assert capget and "effective=0, permitted=1<<CAP_SYS_ADMIN, inheritable=0" in capget[0]
    capsets = [(i, args) for i, (name, args) in enumerate(calls) if name == "capset"]
    assert [re.search(r"\{effective=.*\}", a).group(0) for _, a in capsets] == [
        "{effective=0, permitted=1<<CAP_SYS_ADMIN, inheritable=0}",
        "{effective=1<<CAP_SYS_ADMIN, permitted=1<<CAP_SYS_ADMIN, inheritable=0}",
        "{effective=0, permitted=0, inheritable=0}",
    ], text
    (keep, _), (raise_, _), (drop, _) = capsets
    # Between raising and dropping: the ioctl and nothing else.
    assert calls[raise_ + 1:drop] == [calls[raise_ + 1]], text
    assert calls[raise_ + 1][0] == "ioctl" and "BLKFLSBUF" in calls[raise_ + 1][1], text
    # The device is looked at through an O_PATH fd first, then that inode is
    # opened with the caller's permissions through /proc/self/fd: before the raise.
    opens = [i for i, (name, args) in enumerate(calls) if name in ("openat", "open")
             and (loopdev in args or "/proc/self/fd/" in args)]
    assert len(opens) == 2 and keep < opens[0] < opens[1] < raise_, text
    first, second = calls[opens[0]][1], calls[opens[1]][1]
    assert f'"{loopdev}"' in first and "O_PATH" in first, text
    pfd = re.search(r"= (\d+)$", first).group(1)
    assert f'"/proc/self/fd/{pfd}"' in second, text
    assert "O_RDONLY|O_NOCTTY|O_NONBLOCK|O_CLOEXEC" in second, text
    # Nothing is executed or written; it ends right after dropping.
    assert not {"execve", "execveat", "write", "unlink", "unlinkat"} & set(names), text
    assert all(name in ("exit_group", "exit") for name in names[drop + 1:]), text
