"""Attach and detach loop devices with losetup(8), for the demo and tests."""

import subprocess

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


def attach(backing, read_only=False, partscan=False):
    """Attach ``backing`` to a free loop device; its path (/dev/loopN)."""
    args = ["--find", "--show"]
    if read_only:
        args.append("--read-only")
    if partscan:
        args.append("--partscan")
    return _losetup(*args, str(backing))


def detach(device):
    """Detach a loop device attached by attach()."""
    _losetup("--detach", device)
