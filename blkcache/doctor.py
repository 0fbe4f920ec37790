"""``blkcache doctor``: what blkcache can do here, as this user, and how to fix it.

``doctor(paths)`` returns a DoctorReport: kernel, whether cachestat(2)
exists, this process's effective capabilities, the helper and its file
capability (every place searched for it: the one used, and why not the
others), the method ``drop`` would use, for each path whether
cachestat/mincore will tell this user the truth about its page cache (the
rule of Linux 6.14 for cachestat, of 5.2 for mincore), and the failed
write-backs on record (blkcache.failures), each live, stale or unknown.
Every problem comes with a fix.  The CLI only renders this.
"""

import errno
import os
import pwd
import shlex
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from . import caps, failures, privilege
from .errors import StateDirError, UnsupportedFileError


@dataclass(frozen=True)
class Problem:
    """Something that keeps blkcache from doing its whole job, and the fix."""

    subject: str
    problem: str
    fix: Optional[str]


@dataclass(frozen=True)
class DeviceCheck:
    """What this user gets from one path."""

    path: str
    opened: bool
    error: Optional[str]            # why it could not be opened
    kind: Optional[str]             # "block" or "file"
    cachestat: Optional[str]        # "answers", "refused" (EPERM), "missing" (ENOSYS)
    mincore: Optional[str]          # "answers", "refused" (would claim all resident)
    answers: bool                   # status/verify give counts, not "unknown"
    drop_method: Optional[str]      # what drop --method auto uses on the whole path


@dataclass(frozen=True)
class DoctorReport:
    kernel: str
    cachestat_available: Optional[bool]     # None: the probe failed otherwise
    uid: int
    user: str
    effective_caps: Tuple[str, ...]
    cap_sys_admin: bool
    cap_fowner: bool
    no_new_privs: bool
    helper: privilege.HelperStatus
    helpers: Tuple[privilege.HelperCandidate, ...]  # the search, in order
    drop_method: privilege.MethodChoice
    setcap_command: str                     # grants the capability to a trusted helper
    devices: Tuple[DeviceCheck, ...]
    problems: Tuple[Problem, ...]
    #: Whether the kernel numbers disk instances (BLKGETDISKSEQ, Linux 5.15):
    #: without, a failure record blocks every device with its number.
    diskseq: Optional[bool] = None
    state_dir: str = ""
    #: failures.Failure records, each with its state.
    failures: Tuple[object, ...] = ()

    @property
    def ok(self):
        return not self.problems

    def to_dict(self):
        data = asdict(self)
        data["failures"] = [f.to_dict() for f in self.failures]
        data["ok"] = self.ok
        return data


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def cachestat_available():
    """Whether the kernel has cachestat(2): probed on a memfd this process owns."""
    from . import native

    try:
        fd = os.memfd_create("blkcache-probe", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, 4096)
        try:
            native.cachestat(fd, 0, 4096)
        except OSError as exc:
            return False if exc.errno == errno.ENOSYS else None
        return True
    finally:
        os.close(fd)


def _residency_fix(path, user):
    quoted = shlex.quote(path)
    return (f"let {user} write the node (e.g. setfacl -m u:{shlex.quote(user)}:rw "
            f"{quoted}; note that write access lets it overwrite the device), make it the "
            f"owner, or grant CAP_FOWNER; else status/verify say \"unknown\" (exit 3)")


def check_device(path, method_choice, user):
    """DeviceCheck of ``path`` for this process, plus its problems."""
    from . import api

    problems = []
    try:
        target = api.Target(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM):
            fix = (f"let {user} read the node (e.g. setfacl -m u:{shlex.quote(user)}:r "
                   f"{shlex.quote(path)}, or add it to the node's group)")
        elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
            fix = "check the path: no such file or device node"
        elif exc.errno in (errno.ENXIO, errno.ENODEV):
            fix = "no device behind the node (detached, or its driver gone)"
        else:
            fix = "check the device and the kernel log"
        problems.append(Problem(path, f"cannot open: {reason}", fix))
        return DeviceCheck(path, False, reason, None, None, None, False, None), problems
    except UnsupportedFileError as exc:
        problems.append(Problem(path, exc.message, "name a block device or regular file"))
        return (DeviceCheck(path, False, exc.message, None, None, None, False, None),
                problems)
    with target:
        length = min(target.size, api.PAGE_SIZE) or None
        answers = {}
        for interface in ("cachestat", "mincore"):
            if not target.size:
                answers[interface] = "answers"
                continue
            try:
                state = target.status(0, length, interface)
            except OSError as exc:
                answers[interface] = "missing" if exc.errno == errno.ENOSYS else \
                    f"error: {exc.strerror}"
                continue
            answers[interface] = "answers" if state.exact else "refused"
        usable = answers["cachestat"] == "answers" or (
            answers["cachestat"] == "missing" and answers["mincore"] == "answers")
        if not usable:
            problems.append(Problem(
                path, "the kernel will not tell this user what is cached "
                      f"(cachestat: {answers['cachestat']}, mincore: {answers['mincore']})",
                _residency_fix(path, user)))
        method = method_choice.method if target.kind == "block" else "fadvise"
        return (DeviceCheck(path, True, None, target.kind, answers["cachestat"],
                            answers["mincore"], usable, method), problems)


def failure_records():
    """(records, problems): the failed write-backs on record and what to do."""
    shown = failures.state_dir()
    try:
        found = failures.records()
    except StateDirError as exc:
        return (), [Problem(exc.path, exc.message, exc.fix)]
    except OSError as exc:
        return (), [Problem(shown, f"cannot read the failure records: {exc.strerror or exc}",
                            "let this user read the directory, or run doctor as root")]
    problems = []
    for failure in found:
        if failure.state == "stale":
            continue        # blocks nothing; listed, and --prune removes it
        quoted = shlex.quote(failure.path)
        if failure.problem is not None:
            what = f"record {failure.record} cannot be read ({failure.problem})"
        else:
            what = failure.describe()
        problems.append(Problem(
            failure.path, f"{what}: drop refuses",
            "save what is needed from the cache, then "
            f"blkcache drop --discard-failed {quoted} (or blkcache failures --clear {quoted})"))
    return tuple(found), problems


def doctor(paths=()):
    """A DoctorReport for this process and each of ``paths``."""
    uid = os.geteuid()
    user = _user_name(uid)
    eff = caps.effective_caps()
    search = privilege.find_helper()
    helper = search.helper
    choice = privilege.auto_method(helper)
    available = cachestat_available()
    problems = []
    if available is False:
        problems.append(Problem(
            "kernel", f"Linux {os.uname().release} has no cachestat(2) (new in 6.5): "
                      "residency comes from mincore(2), slower on big devices and "
                      "without dirty counts, so drop --expect-clean cannot decide",
            "upgrade to Linux 6.5 or later"))
    if choice.method == "fadvise":
        problems.append(Problem("drop", f"drop falls back to posix_fadvise: "
                                        f"{helper.problem}", helper.fix))
    diskseq = failures.diskseq_available()
    if diskseq is False:
        problems.append(Problem(
            "kernel", f"Linux {os.uname().release} has no disk sequence numbers "
                      "(BLKGETDISKSEQ, new in 5.15): a failed write-back record blocks "
                      "every later device with the same major:minor until cleared",
            "upgrade to Linux 5.15 or later; clear a record with blkcache failures --clear"))
    records, found = failure_records()
    problems.extend(found)
    devices = []
    for path in paths:
        check, found = check_device(os.fspath(path), choice, user)
        devices.append(check)
        problems.extend(found)
    return DoctorReport(
        kernel=os.uname().release, cachestat_available=available, uid=uid, user=user,
        effective_caps=tuple(privilege.cap_names(eff)),
        cap_sys_admin=bool(eff >> caps.CAP_SYS_ADMIN & 1),
        cap_fowner=bool(eff >> caps.CAP_FOWNER & 1),
        no_new_privs=helper.no_new_privs, helper=helper, helpers=search.summary(),
        drop_method=choice,
        setcap_command=(privilege.setcap_command(helper.path) if helper.trusted is not False
                        else "blkcache install-helper"),
        devices=tuple(devices), problems=tuple(problems), diskseq=diskseq,
        state_dir=failures.state_dir(), failures=records)


__all__ = ["DoctorReport", "DeviceCheck", "Problem", "doctor", "cachestat_available"]
