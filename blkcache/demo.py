"""blkcache demo: the migration hazard and its remedy, on scratch loop devices.

Two loop devices on one sparse backing file stand for two hosts on shared
storage.  The "destination" caches a stale page while it probes the volume,
the "source" writes new data, and a buffered read on the destination returns
the old bytes until blkcache drops its cache.
"""

import contextlib
import os
import tempfile

from . import api, loop
from .errors import BlkcacheError, UsageError

DEFAULT_SIZE = 256 << 20
PROBE = 64 << 20
OLD = b"old data, cached by the destination's probe\n".ljust(4096, b".")
NEW = b"new data, written by the source host\n".ljust(4096, b"!")


def _read_all(fd, length, chunk=1 << 20):
    for pos in range(0, length, chunk):
        os.pread(fd, min(chunk, length - pos), pos)


def run(size=DEFAULT_SIZE, tmpdir=None):
    """Yield (step, detail) pairs while running the demo; cleans up on exit."""
    if os.geteuid() != 0:
        raise BlkcacheError("demo needs root: it attaches loop devices with losetup "
                            "(try: sudo blkcache demo)")
    if size < len(OLD):
        raise UsageError(f"demo volume size must be at least {len(OLD)} bytes "
                         "(the stale page it shows)")
    probe = min(PROBE, size)
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="blkcache-demo-", dir=tmpdir or "/var/tmp"))
        image = os.path.join(workdir, "volume.img")
        with open(image, "wb") as f:
            f.truncate(size)
            f.write(OLD)
        yield "image", f"sparse backing file {image} ({api.format_size(size)})"

        source = loop.attach(image)
        stack.callback(loop.detach, source)
        dest = loop.attach(image)
        stack.callback(loop.detach, dest)
        yield "attach", f"source host: {source}, destination host: {dest} (same volume)"

        # The destination QEMU opens the volume and probes it; it stays open.
        held = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, held)
        _read_all(held, probe)
        yield "probe", f"destination read {api.format_size(probe)} and holds {dest} open"

        wfd = os.open(source, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(wfd, NEW, 0)
            os.fsync(wfd)
        finally:
            os.close(wfd)
        yield "write", f"source wrote new data at offset 0 of {source} and synced it"

        state = api.status(dest)
        yield "status", (f"{dest}: {state.cached} pages "
                         f"({api.format_size(state.cached_bytes)}) cached, "
                         f"{state.dirty} dirty")
        stale = os.pread(held, len(NEW), 0) != NEW
        yield "stale", (f"buffered read on {dest}: "
                        + ("OLD bytes: the destination would read stale data" if stale
                           else "new bytes"))

        result = api.drop(dest)
        yield "drop", (f"{dest}: {result.before.cached} -> {result.after.cached} pages "
                       f"cached (method {result.method}, {result.attempts} attempt(s))")

        check = api.verify(dest)
        yield "verify", f"{dest}: {check.verdict}"
        fresh = os.pread(held, len(NEW), 0) == NEW
        yield "reread", (f"buffered read on {dest}: "
                         + ("new bytes: the destination is coherent" if fresh
                            else "STILL STALE"))
        if not (stale and fresh and check.verdict == "clean"):
            raise BlkcacheError("demo: the scenario did not behave as expected")
    yield "cleanup", "loop devices detached, scratch file removed"
