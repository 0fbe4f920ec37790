"""The helper is used only when nobody but root can change it (issue 10.3).

A user who can write blkcache-flush can change its code through a shared
mapping and keep cap_sys_admin+p (write(2) clears a file capability, a write
through mmap does not).  So doctor and drop treat a copy as unusable unless it
and every directory above it are root's and not writable by group or others
(a sticky directory like /var/tmp may be, when the entry in it is root's: the
`nobody` fixture's copy lives in one).  Each test spoils the copy as an
administrator might, grants it the capability, and shows that the kernel would
honour it while blkcache refuses it and says what to fix.
"""

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

import pytest

from blkcache import privilege

import kernel
from unprivileged import cached_loop, node_mode

NOBODY = pwd.getpwnam("nobody")


def _owned_by_nobody(unpriv):
    os.chown(unpriv.helper, NOBODY.pw_uid, NOBODY.pw_gid)
    return (f"{unpriv.helper} is owned by nobody (uid 65534), not root",
            f"chown root:root {unpriv.helper} && chmod go-w {unpriv.helper} && "
            f"setcap cap_sys_admin+p {unpriv.helper}")


def _group_writable(unpriv):
    os.chmod(unpriv.helper, 0o775)
    return (f"{unpriv.helper} is writable by group",
            f"chown root:root {unpriv.helper} && chmod go-w {unpriv.helper}")


def _directory_owned_by_nobody(unpriv):
    os.chown(unpriv.package, NOBODY.pw_uid, NOBODY.pw_gid)
    return (f"{unpriv.package} is owned by nobody (uid 65534), not root",
            f"chown root {unpriv.package}")


def _directory_writable_by_all(unpriv):
    os.chmod(unpriv.package, 0o777)
    return (f"{unpriv.package} is writable by group and others",
            f"chmod go-w {unpriv.package}")


SPOILERS = {"helper owned by nobody": _owned_by_nobody,
            "helper group-writable": _group_writable,
            "directory owned by nobody": _directory_owned_by_nobody,
            "directory writable by all": _directory_writable_by_all}


@pytest.fixture(params=sorted(SPOILERS))
def spoiled(request, nobody):
    """The nobody copy's helper made changeable by nobody, then granted
    cap_sys_admin+p (setcap after chown: chown clears capabilities)."""
    helper_st, package_st = os.stat(nobody.helper), os.stat(nobody.package)
    try:
        problem, fix = SPOILERS[request.param](nobody)
        nobody.grant()
        yield nobody, problem, fix
    finally:
        nobody.revoke()
        for path, st in ((nobody.helper, helper_st), (nobody.package, package_st)):
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, stat.S_IMODE(st.st_mode))


def test_a_helper_others_can_change_is_not_used(spoiled, loopdev):
    unpriv, problem, fix = spoiled
    proc = unpriv.blkcache("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    helper = report["helper"]
    assert helper["path"] == unpriv.helper and helper["cap_sys_admin"] is True
    assert helper["trusted"] is False and helper["usable"] is False
    assert helper["problem"].startswith(f"{unpriv.helper} is not trusted: ")
    assert problem in helper["problem"], helper["problem"]
    assert fix in helper["fix"], helper["fix"]
    assert helper["fix"].endswith("or install a root-owned copy: blkcache install-helper")
    assert report["drop_method"]["method"] == "fadvise"
    assert report["setcap_command"] == "blkcache install-helper"
    [drop_problem] = [p for p in report["problems"] if p["subject"] == "drop"]
    assert problem in drop_problem["problem"] and drop_problem["fix"] == helper["fix"]
    text = unpriv.blkcache("doctor").stdout
    assert f"helper:        {unpriv.helper} (cap_sys_admin=p, not trusted)" in text
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        proc = unpriv.blkcache("drop", "--method", "helper", loopdev)
        assert proc.returncode == 5, proc.stderr
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"blkcache: {loopdev}: blkcache-flush cannot flush: "
                               f"{unpriv.helper} is not trusted: ")
        assert problem in line and f"(fix: {helper['fix']})" in line
        kernel.not_dropped(loopdev.fd, before)
        # The kernel would have honoured that copy's capability: it was a real hazard.
        proc = unpriv.run(unpriv.helper, loopdev)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert kernel.cached_pages(loopdev) == 0


# -- the rule itself, on scratch trees (root) ---------------------------------------

@pytest.fixture
def tree():
    """A root-owned 0755 directory under /var/tmp (sticky, root's entry: trusted)."""
    path = tempfile.mkdtemp(prefix="blkcache-trust-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _file(path, mode=0o755, owner=0):
    with open(path, "wb") as f:
        f.write(b"\x7fELF")
    os.chmod(path, mode)
    os.chown(path, owner, owner and NOBODY.pw_gid)
    return path


def test_trusted_under_root_directories_and_a_sticky_one(tree):
    assert privilege.untrusted(_file(os.path.join(tree, "ok"))) is None
    sticky = os.path.join(tree, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    assert privilege.untrusted(_file(os.path.join(sticky, "ok"))) is None


def test_sticky_directory_with_an_entry_of_another_user(tree):
    sticky = os.path.join(tree, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    theirs = os.path.join(sticky, "theirs")
    os.mkdir(theirs)
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)
    problem, fix = privilege.untrusted(_file(os.path.join(theirs, "helper")))
    assert f"{theirs} is owned by nobody (uid 65534), not root" in problem
    assert (f"{sticky} is writable by group and others (sticky, but the entry in it is "
            "not root's)") in problem
    assert fix == (f"as root, chown root {theirs}; or install a root-owned copy: "
                   "blkcache install-helper")


def test_a_symbolic_link_is_judged_by_its_target(tree):
    shared = os.path.join(tree, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    target = _file(os.path.join(shared, "helper"))
    link = os.path.join(tree, "link")
    os.symlink(target, link)
    problem, _fix = privilege.untrusted(link)
    assert f"{shared} is writable by group and others" in problem


def test_helper_status_reports_distrust_before_the_missing_capability(tree):
    shared = os.path.join(tree, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o775)
    path = os.path.join(shared, "blkcache-flush")
    shutil.copy2(privilege.helper_path(), path)
    status = privilege.helper_status(path, probe=False)
    assert status.trusted is False and status.usable is False
    # Not "setcap it": a capability on that copy is what must not happen.
    assert "setcap" not in status.fix and status.problem.startswith(f"{path} is not trusted")
    subprocess.run(["setcap", "cap_sys_admin+p", path], check=True)
    assert privilege.helper_status(path).granted is None    # never run, not even probed
