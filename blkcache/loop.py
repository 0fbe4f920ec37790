"""Attach and detach loop devices with losetup(8), for the demo, tests and bench."""

import subprocess
import time

from .errors import BlkcacheError


def _losetup(*args):
    try:
        proc = subprocess.run(["losetup", *args], capture_output=True, text=True,
                              timeout=60, check=False)
    except FileNotFoundError:
        raise BlkcacheError("losetup(8) not found (util-linux)") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise BlkcacheError(f"losetup {' '.join(args)}: {msg[-1] if msg else 'failed'}")
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
    """Detach a loop device attached by attach().

    Retried while the device is briefly busy (udev probing it after a
    change); a device that is already gone is fine.
    """
    for attempt in range(tries):
        try:
            _losetup("--detach", device)
            return
        except BlkcacheError as exc:
            if "No such device" in str(exc):
                return
            if attempt == tries - 1:
                raise
        time.sleep(pause)
