"""Least privilege: capabilities, the setcap helper, and the drop method.

BLKFLSBUF needs CAP_SYS_ADMIN.  A Python script cannot carry a file
capability, so the privileged step is a tiny C program, ``blkcache-flush``,
built into this package.  It gets ``cap_sys_admin+p`` at install time, never
from setup.py: from the Debian package's postinst, from ``blkcache
install-helper`` or from an administrator's setcap(8).  This module looks for
it in a fixed order (HELPER_DIRS, then the package's own copy; no environment
variable takes part), trusts a copy only when nobody but root can change it,
reads its ``security.capability`` extended attribute, runs it, and decides
which method ``drop`` uses:

- ``ioctl``: BLKFLSBUF in this process, when CAP_SYS_ADMIN is effective;
- ``helper``: BLKFLSBUF through blkcache-flush, when it carries the capability
  and the kernel will honour it (no ``nosuid`` mount, no ``no_new_privs``);
- ``fadvise``: posix_fadvise(POSIX_FADV_DONTNEED), no privilege at all.
"""

import errno
import os
import pwd
import shlex
import stat
import struct
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from . import caps
from .errors import HelperError, MethodUnavailableError

HELPER_NAME = "blkcache-flush"

#: The system locations of the helper, searched in this order before the
#: package's own copy: the Debian package's, then ``blkcache install-helper``'s.
HELPER_DIRS = ("/usr/libexec/blkcache", "/usr/local/libexec/blkcache")

#: Seconds the helper may take (BLKFLSBUF syncs the device first).
HELPER_TIMEOUT = 600

CAP_SYS_ADMIN = caps.CAP_SYS_ADMIN

#: capabilities(7) names, by number (Linux 6.x).
CAP_NAMES = (
    "cap_chown", "cap_dac_override", "cap_dac_read_search", "cap_fowner", "cap_fsetid",
    "cap_kill", "cap_setgid", "cap_setuid", "cap_setpcap", "cap_linux_immutable",
    "cap_net_bind_service", "cap_net_broadcast", "cap_net_admin", "cap_net_raw",
    "cap_ipc_lock", "cap_ipc_owner", "cap_sys_module", "cap_sys_rawio", "cap_sys_chroot",
    "cap_sys_ptrace", "cap_sys_pacct", "cap_sys_admin", "cap_sys_boot", "cap_sys_nice",
    "cap_sys_resource", "cap_sys_time", "cap_sys_tty_config", "cap_mknod", "cap_lease",
    "cap_audit_write", "cap_audit_control", "cap_setfcap", "cap_mac_override",
    "cap_mac_admin", "cap_syslog", "cap_wake_alarm", "cap_block_suspend", "cap_audit_read",
    "cap_perfmon", "cap_bpf", "cap_checkpoint_restore",
)

FADVISE_LIMITS = (
    "posix_fadvise(DONTNEED) drops only clean, unmapped pages that nothing holds; "
    "unlike BLKFLSBUF it neither syncs a file system mounted on the device nor "
    "releases the kernel's per-CPU buffer-head references, so pages may stay "
    "(the verification counts them)")


def cap_names(mask):
    """Names of the capabilities in bit mask ``mask``."""
    return [CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"cap_{bit}"
            for bit in range(mask.bit_length()) if mask >> bit & 1]


def no_new_privs():
    """Whether this process runs with no_new_privs (file capabilities ignored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("NoNewPrivs:"):
                    return line.split()[1] == "1"
    except OSError:
        pass
    return False


# -- file capabilities ---------------------------------------------------------

XATTR_CAPS = "security.capability"
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
_REVISIONS = {0x01000000: (1, 12), 0x02000000: (2, 20), 0x03000000: (3, 24)}


@dataclass(frozen=True)
class FileCaps:
    """A decoded ``security.capability`` xattr (struct vfs_cap_data)."""

    version: int            # 1, 2 or 3
    permitted: int          # bit masks
    inheritable: int
    effective: bool         # the single "effective" flag of a file
    rootid: Optional[int]   # version 3: the namespace root's uid

    def has(self, cap):
        return bool(self.permitted >> cap & 1)

    def text(self):
        """Like getcap(8): 'cap_sys_admin=p', 'cap_sys_admin=ep', ..."""
        parts = []
        perm = cap_names(self.permitted)
        inh = cap_names(self.inheritable)
        if perm:
            parts.append(",".join(perm) + ("=ep" if self.effective else "=p"))
        if inh:
            parts.append(",".join(inh) + "+i")
        text = " ".join(parts) or "="
        if self.rootid is not None:
            text += f" [rootid={self.rootid}]"
        return text


def decode_file_caps(data):
    """FileCaps from the raw bytes of a security.capability xattr."""
    if len(data) < 4:
        raise ValueError(f"security.capability too short ({len(data)} bytes)")
    magic = struct.unpack_from("<I", data)[0]
    revision = magic & VFS_CAP_REVISION_MASK
    if revision not in _REVISIONS:
        raise ValueError(f"unknown security.capability revision {revision >> 24}")
    version, size = _REVISIONS[revision]
    if len(data) != size:
        raise ValueError(f"security.capability version {version} must be {size} bytes, "
                         f"not {len(data)}")
    words = 1 if version == 1 else 2
    permitted = inheritable = 0
    for i in range(words):
        perm, inh = struct.unpack_from("<II", data, 4 + 8 * i)
        permitted |= perm << (32 * i)
        inheritable |= inh << (32 * i)
    rootid = struct.unpack_from("<I", data, 20)[0] if version == 3 else None
    return FileCaps(version, permitted, inheritable,
                    bool(magic & VFS_CAP_FLAGS_EFFECTIVE), rootid)


def file_caps(path):
    """FileCaps of ``path``, or None when it carries none.  OSError if unreadable."""
    try:
        data = os.getxattr(path, XATTR_CAPS)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    return decode_file_caps(data)


def _rootid_applies(rootid):
    """Whether a version-3 capability with this rootid applies in our user namespace."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            for line in f:
                inside, outside, _count = (int(v) for v in line.split())
                if inside == 0:
                    return outside == rootid
    except (OSError, ValueError):
        pass
    return rootid == 0


# -- trust ------------------------------------------------------------------------

def _owner(uid):
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _writers(mode):
    return " and ".join(who for bit, who in ((0o020, "group"), (0o002, "others"))
                        if mode & bit)


def untrusted(path):
    """(problem, fix) when someone other than root could change the program at
    ``path`` (or its symbolic link's target), else None.

    Whoever may write the file can change its code through a shared mapping
    and keep its file capability; whoever may write a directory above it can
    replace it.  So the file must be root's and not writable by group or
    others, and so must every directory up to ``/`` -- except that a
    directory with the sticky bit (like /tmp) may be writable by others when
    the entry in it is root's, since then only root can rename or remove it.
    """
    real = os.path.realpath(path)
    problems, fixes = [], []
    entry = os.lstat(real)
    quoted = shlex.quote(real)
    if entry.st_uid != 0 or entry.st_mode & 0o022:
        if entry.st_uid != 0:
            problems.append(f"{real} is owned by {_owner(entry.st_uid)}, not root")
        if entry.st_mode & 0o022:
            problems.append(f"{real} is writable by {_writers(entry.st_mode)}")
        fixes.append(f"chown root:root {quoted} && chmod go-w {quoted} && "
                     f"setcap cap_sys_admin+p {quoted}")
    directory = real
    while directory != "/":
        directory = os.path.dirname(directory)
        st = os.lstat(directory)
        quoted_dir = shlex.quote(directory)
        if st.st_uid != 0:
            problems.append(f"{directory} is owned by {_owner(st.st_uid)}, not root")
            fixes.append(f"chown root {quoted_dir}")
        if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and entry.st_uid == 0):
            problems.append(f"{directory} is writable by {_writers(st.st_mode)}"
                            + (" (sticky, but the entry in it is not root's)"
                               if st.st_mode & stat.S_ISVTX else ""))
            if not st.st_mode & stat.S_ISVTX:
                fixes.append(f"chmod go-w {quoted_dir}")
        entry = st
    if not problems:
        return None
    problem = ("not trusted: " + "; ".join(problems)
               + ": a user who can change it could keep its capability and run any code "
                 "with CAP_SYS_ADMIN")
    # Every problem comes with a fix: an entry not root's is chowned where it
    # is checked, a sticky directory is fine once its entry is.
    fix = (f"as root, {' && '.join(fixes)}; or install a root-owned copy: "
           "blkcache install-helper")
    return problem, fix


# -- the helper -----------------------------------------------------------------

def helper_path():
    """The package's own copy of the helper, built into this package's directory."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), HELPER_NAME)


def helper_candidates():
    """Every place drop looks for the helper, in order: HELPER_DIRS, then the
    package's own copy."""
    return tuple(os.path.join(d, HELPER_NAME) for d in HELPER_DIRS) + (helper_path(),)


def setcap_command(path=None):
    """The command an administrator runs to grant the helper its capability."""
    return f"setcap cap_sys_admin+p {shlex.quote(path or helper_path())}"


@dataclass(frozen=True)
class HelperStatus:
    """The helper as this process sees it; ``usable`` when drop can use it."""

    path: str
    installed: Optional[bool]       # None: this user cannot look
    executable: bool
    trusted: Optional[bool]         # nobody but root can change it (None: not known)
    capabilities: Optional[str]     # getcap-style text, None when none
    cap_sys_admin: bool             # CAP_SYS_ADMIN in the file's permitted set
    nosuid: bool                    # on a nosuid mount: file capabilities ignored
    no_new_privs: bool              # this process runs with no_new_privs
    granted: Optional[bool]         # the kernel gave the helper CAP_SYS_ADMIN when
                                    # run from this process (None: not probed)
    usable: bool
    problem: Optional[str]
    fix: Optional[str]

    def to_dict(self):
        return asdict(self)


def probe_helper(path):
    """Whether the kernel grants the helper CAP_SYS_ADMIN when we run it.

    The helper checks its permitted set before it looks at the file: given
    ``fd:0`` with /dev/null on stdin it says "not a block device" (exit 2)
    when it holds the capability, "CAP_SYS_ADMIN is not permitted" (exit 1)
    when the kernel withheld it (nosuid mount, no_new_privs, user namespace,
    a security module...).  None when the answer is neither.
    """
    import subprocess

    try:
        proc = subprocess.run([path, "fd:0"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={},
                              cwd="/", timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 2 and err.endswith(": not a block device\n"):
        return True
    if proc.returncode == 1 and "CAP_SYS_ADMIN is not permitted" in err:
        return False
    return None


_PROBED = {}


def _probe_once(path, st):
    """probe_helper(path), asked once per process for each version of the file
    (a new file, or a new capability, changes the inode or its ctime)."""
    key = (path, st.st_dev, st.st_ino, st.st_ctime_ns)
    if key not in _PROBED:
        _PROBED[key] = probe_helper(path)
    return _PROBED[key]


def _probe_problem(path, granted, nosuid, nnp):
    """(problem, fix) when the probe did not find the capability granted."""
    if granted is False and nosuid:
        return (f"{path} is on a file system mounted nosuid, where the kernel "
                "ignores file capabilities",
                "install blkcache on a file system mounted without nosuid")
    if granted is False and nnp:
        return ("this process runs with no_new_privs, and the kernel grants no "
                "file capability to the programs it starts",
                "run blkcache without no_new_privs (systemd: NoNewPrivileges=no; "
                "setpriv/bwrap without --no-new-privs)")
    if granted is False:
        return (f"the kernel does not grant {path} its file capability when this "
                "process runs it (user namespace or security module?)",
                "run blkcache in the initial user namespace, unconfined")
    return (f"{path} did not answer its capability probe as expected",
            f"reinstall blkcache; check that {path} is the blkcache-flush it built")


def helper_status(path=None, probe=True):
    """HelperStatus of the helper at ``path`` (default: the one drop would use,
    see find_helper).

    With ``probe``, a trusted helper that carries the capability is run once
    (see probe_helper) so that the answer is the kernel's, not a guess.
    """
    if path is None:
        return find_helper(probe).helper
    installed, executable, trusted, text, has_cap, nosuid = None, False, None, None, False, \
        False
    granted = None
    nnp = no_new_privs()
    problem = fix = None
    try:
        st = os.stat(path)
        installed = True
    except FileNotFoundError:
        installed = False
    except OSError as exc:
        problem = f"this user cannot reach {path} ({exc.strerror})"
        fix = ("install the helper where every user can reach it: as root, "
               "blkcache install-helper")
    if installed:
        executable = os.access(path, os.X_OK)
        try:
            distrust = untrusted(path)
        except OSError as exc:
            distrust = (f"not trusted: cannot check who may change it ({exc.strerror}: "
                        f"{exc.filename})", "as root, blkcache install-helper")
        trusted = distrust is None
        try:
            fcaps = file_caps(path)
        except (OSError, ValueError) as exc:
            fcaps = None
            problem = f"cannot read its capabilities ({exc})"
        if fcaps is not None:
            text = fcaps.text()
            has_cap = fcaps.has(CAP_SYS_ADMIN) and (
                fcaps.rootid is None or _rootid_applies(fcaps.rootid))
        try:
            nosuid = bool(os.statvfs(path).f_flag & os.ST_NOSUID)
        except OSError:
            pass
    if installed is False:
        problem = f"{HELPER_NAME} is not installed (no {path})"
        fix = ("reinstall blkcache with a C compiler present (pip install blkcache)"
               if path == helper_path() else None)
    elif installed and not executable:
        problem = f"this user may not execute {path}"
        fix = f"chmod 0755 {shlex.quote(path)}"
    elif installed and not trusted:
        problem, fix = f"{path} is {distrust[0]}", distrust[1]
    elif installed and problem is None and not has_cap:
        problem = (f"{path} does not carry the file capability cap_sys_admin+p"
                   if text is None else
                   f"{path} carries {text}, not cap_sys_admin in its permitted set")
        fix = setcap_command(path)
    if installed and executable and trusted and has_cap and problem is None and probe:
        granted = _probe_once(path, st)
        if not granted:
            problem, fix = _probe_problem(path, granted, nosuid, nnp)
    usable = bool(installed and executable and trusted and has_cap and granted
                  and problem is None)
    return HelperStatus(path, installed, executable, trusted, text, has_cap, nosuid, nnp,
                        granted, usable, problem, fix)


@dataclass(frozen=True)
class HelperSearch:
    """Every candidate of helper_candidates(), in order, and the one in use.

    ``helper`` is the first usable candidate; when none is, the first one
    that exists (else the package's own copy), whose problem says why drop
    cannot use it.
    """

    candidates: Tuple[HelperStatus, ...]
    helper: HelperStatus

    def why_not(self, candidate):
        """Why drop does not use ``candidate`` (None for the one it uses)."""
        if candidate.usable and candidate is self.helper:
            return None
        if candidate.problem:
            return candidate.problem
        return f"{self.helper.path} comes first in the search order"

    def summary(self):
        """A HelperCandidate per candidate, in search order."""
        return tuple(HelperCandidate(c.path, self.why_not(c) is None, self.why_not(c))
                     for c in self.candidates)


@dataclass(frozen=True)
class HelperCandidate:
    """One place drop looks for the helper: used, or why not."""

    path: str
    used: bool
    why_not: Optional[str]


def find_helper(probe=True):
    """HelperSearch over helper_candidates(): the first trusted candidate that
    carries cap_sys_admin+p (and, with ``probe``, is granted it by the kernel)."""
    candidates, used = [], None
    for path in helper_candidates():
        status = helper_status(path, probe=probe and used is None)
        if used is None and status.installed and status.trusted and status.cap_sys_admin \
                and (status.usable or not probe):
            used = status
        candidates.append(status)
    if used is None:
        used = next((c for c in candidates if c.installed), candidates[-1])
    return HelperSearch(tuple(candidates), used)


def ioctl_fix(helper=None):
    """What makes --method ioctl work: root, or the helper instead."""
    helper = helper or helper_status()
    if helper.usable:
        return (f"run as root (CAP_SYS_ADMIN), or use --method helper or auto: "
                f"{HELPER_NAME} carries cap_sys_admin+p")
    grant = setcap_command(helper.path) if helper.trusted else "blkcache install-helper"
    return ("run as root (CAP_SYS_ADMIN), or let this user drop through the helper: "
            f"as root, {grant}, then use --method helper or auto")


@dataclass(frozen=True)
class MethodChoice:
    """What ``drop --method auto`` uses for a whole block device, and why."""

    method: str             # "ioctl", "helper" or "fadvise"
    reason: str
    fix: Optional[str] = None

    def to_dict(self):
        return asdict(self)


def auto_method(helper=None):
    """The method auto picks for a whole block device in this process."""
    if caps.has_sys_admin():
        return MethodChoice("ioctl", "CAP_SYS_ADMIN is effective: BLKFLSBUF in process")
    helper = helper or helper_status()
    if helper.usable:
        return MethodChoice("helper", f"no CAP_SYS_ADMIN; {HELPER_NAME} carries "
                                      "cap_sys_admin+p: BLKFLSBUF through the helper")
    return MethodChoice("fadvise", f"no CAP_SYS_ADMIN and no usable {HELPER_NAME} "
                                   f"({helper.problem}); {FADVISE_LIMITS}", helper.fix)


def fallback_warning(choice=None):
    """The warning drop gives when auto falls back to posix_fadvise; ``choice``
    is auto_method()'s answer, when the caller has it already."""
    choice = choice or auto_method()
    text = f"BLKFLSBUF unavailable, dropping with posix_fadvise: {choice.reason}"
    return text + (f"; fix: {choice.fix}" if choice.fix else "")


def require_helper(path_for_errors=None):
    """HelperStatus of a usable helper, or MethodUnavailableError with the fix."""
    helper = helper_status()
    if not helper.usable:
        raise MethodUnavailableError(f"{HELPER_NAME} cannot flush: {helper.problem}",
                                     path_for_errors, fix=helper.fix)
    return helper


# -- running the helper -----------------------------------------------------------

def _errno_of(output):
    """The errno the helper printed on stdout (one decimal line), or None."""
    text = output.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def run_helper(fd, path, helper=None, timeout=HELPER_TIMEOUT):
    """BLKFLSBUF on open fd ``fd`` (of ``path``) through the helper.

    The helper gets the fd itself (``fd:N``), so it acts on exactly the
    device this process opened, with no second path lookup.  ``helper``
    defaults to the one find_helper() picks (its probe is asked once per
    process).  Raises MethodUnavailableError (no usable helper), OSError with
    the errno the helper reported, or HelperError.
    """
    import subprocess

    if helper is None:
        helper = require_helper(path).path
    try:
        proc = subprocess.run([helper, f"fd:{fd}"], pass_fds=(fd,), env={}, cwd="/",
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HelperError(f"{HELPER_NAME} did not finish within {timeout} s", path) \
            from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot run {helper}: {exc.strerror}", path) from None
    if proc.returncode == 0:
        return
    lines = [line for line in proc.stderr.decode("utf-8", "backslashreplace").splitlines()
             if line.strip()]
    message = lines[-1] if lines else f"exit status {proc.returncode}, no message"
    prefix = HELPER_NAME + ": "
    detail = message[len(prefix):] if message.startswith(prefix) else message
    err = _errno_of(proc.stdout) if proc.returncode == 1 else None
    if err == errno.EPERM and "CAP_SYS_ADMIN" in detail:
        raise MethodUnavailableError(f"{HELPER_NAME}: {detail}", path,
                                     fix=setcap_command(helper))
    if err is not None:
        raise OSError(err, f"{HELPER_NAME}: {detail}", path)
    raise HelperError(f"{HELPER_NAME} failed (exit status {proc.returncode}): {detail}",
                      path)


__all__ = ["HELPER_DIRS", "HELPER_NAME", "FileCaps", "HelperCandidate", "HelperSearch",
           "HelperStatus", "MethodChoice", "auto_method", "cap_names", "decode_file_caps",
           "fallback_warning", "file_caps", "find_helper", "helper_candidates", "helper_path",
           "helper_status", "no_new_privs", "run_helper", "setcap_command", "untrusted"]
