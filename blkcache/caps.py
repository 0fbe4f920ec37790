"""Capabilities of this process: capget(2) via the native module, else
/proc/self/status."""

CAP_FOWNER = 3
CAP_SYS_ADMIN = 21


def _cap_mask(field):
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def effective_caps():
    """The effective capability set as an int bit mask."""
    try:
        from . import native
    except ImportError:
        return _cap_mask("CapEff")
    try:
        return native.effective_caps()
    except OSError:
        return _cap_mask("CapEff")


def has_cap(cap):
    """Whether capability number ``cap`` is in the effective set."""
    return bool(effective_caps() >> cap & 1)


def has_sys_admin():
    """Whether CAP_SYS_ADMIN is effective (BLKFLSBUF will be allowed)."""
    return has_cap(CAP_SYS_ADMIN)
