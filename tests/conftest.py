"""Fixtures: real loop devices on sparse files, always detached.

A test that uses a loop device (through any fixture that needs
``loop_available``) is marked ``loop`` here: ``pytest -m "not loop"`` runs
the rest, which needs neither root nor loop devices.
"""

import contextlib
import os
import shutil
import sys
import tempfile

import pytest

from blkcache import loop
from blkcache.errors import BlkcacheError

sys.path.insert(0, os.path.dirname(__file__))

import evict  # noqa: E402
from test_recursive import partitioned  # noqa: E402,F401  (a disk with two partitions)
from units import MiB  # noqa: E402
from unprivileged import granted, nobody  # noqa: E402,F401  (fixtures for every module)

REQUIRE_LOOP = os.environ.get("BLKCACHE_REQUIRE_LOOP") == "1"


def pytest_collection_modifyitems(items):
    for item in items:
        if "loop_available" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.loop)


def _loop_problem():
    if os.geteuid() != 0:
        return "loop devices need root"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop module missing)"
    if shutil.which("losetup") is None:
        return "losetup(8) not installed"
    return None


@pytest.fixture(scope="session")
def loop_available():
    problem = _loop_problem()
    if problem:
        if REQUIRE_LOOP:
            pytest.fail(f"BLKCACHE_REQUIRE_LOOP=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture
def scratch_dir():
    """A disk-backed temporary directory (not tmpfs), removed afterwards."""
    path = tempfile.mkdtemp(prefix="blkcache-test-", dir="/var/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Loops:
    """Attach loop devices and hold them open; undo all of it at the end."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.devices = []
        self.fds = []
        self.count = 0

    def image(self, size=64 * MiB, name=None):
        self.count += 1
        path = os.path.join(self.workdir, name or f"img{self.count}")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def attach(self, backing=None, size=64 * MiB, read_only=False, partscan=False):
        if backing is None:
            backing = self.image(size)
        device = loop.attach(backing, read_only, partscan)
        self.devices.append(device)
        return device

    def hold(self, device, flags=os.O_RDONLY):
        """Keep device open (its cache lives only while someone does)."""
        fd = os.open(device, flags | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self):
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        errors = []
        for device in reversed(self.devices):
            try:
                loop.detach(device)
            except BlkcacheError as exc:
                errors.append(str(exc))
        self.devices.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


@pytest.fixture
def loops(loop_available, scratch_dir):
    manager = Loops(scratch_dir)
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def loopdev(loops):
    """A 64 MiB loop device, held open by the test (fd in loopdev.fd)."""
    device = loops.attach(size=64 * MiB)
    fd = loops.hold(device)
    return Device(device, fd)


class Device(str):
    """A device path that also carries the fd holding it open."""

    def __new__(cls, path, fd):
        obj = super().__new__(cls, path)
        obj.fd = fd
        return obj


@pytest.fixture(autouse=True)
def _neutral_cwd(tmp_path, monkeypatch):
    """Run every test outside the source tree, so `python -m blkcache` in a
    subprocess imports the installed package (with its built extension), not
    the checkout's sources."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path, monkeypatch):
    """Failed write-backs are recorded under BLKCACHE_STATE_DIR, not /run."""
    monkeypatch.setenv("BLKCACHE_STATE_DIR", str(tmp_path / "state"))


def pytest_terminal_summary(terminalreporter):
    """Say what the eviction stressor (tests/evict.py) did in this run."""
    if evict.PAGES:
        terminalreporter.write_line(f"eviction stressor: {evict.evicted} cached pages evicted "
                                    f"(BLKCACHE_TEST_EVICT={evict.PAGES})")
