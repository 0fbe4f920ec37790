"""Attach and detach loop devices with losetup(8), for the demo, tests and bench."""

import subprocess
import time

from .errors import BlkcacheError


def _run(*args):
    try:
        return subprocess.run(["losetup", *args], capture_output=True, text=True,
                              timeout=60, check=False)
    except FileNotFoundError:
        raise BlkcacheError("losetup(8) not found (util-linux)") from None


def _failed(args, proc):
    msg = proc.stderr.strip().splitlines()
    return BlkcacheError(f"losetup {' '.join(args)}: {msg[-1] if msg else 'failed'}")


def _losetup(*args):
    proc = _run(*args)
    if proc.returncode != 0:
        raise _failed(args, proc)
    return proc.stdout.strip()


def attach(backing, read_only=False, partscan=False, direct_io=False):
    """Attach ``backing`` to a free loop device; its path (/dev/loopN).

    ``direct_io``: the loop device reads and writes its backing file with
    O_DIRECT, so that its own page cache is the only copy (as on a real host);
    where the backing file system cannot, the device is attached without.
    """
    args = ["--find", "--show"]
    if read_only:
        args.append("--read-only")
    if partscan:
        args.append("--partscan")
    if direct_io:
        try:
            return _losetup(*args, "--direct-io=on", str(backing))
        except BlkcacheError:
            pass
    return _losetup(*args, str(backing))


def detach(device, tries=50, pause=0.1):
    """Detach a loop device attached by attach(), retrying while it is briefly
    busy (a file system just unmounted, a reader just gone); one that is
    already detached is fine."""
    for _ in range(tries):
        proc = _run("--detach", device)
        if proc.returncode == 0 or "No such device" in proc.stderr:
            return
        time.sleep(pause)
    raise _failed(("--detach", device), proc)
