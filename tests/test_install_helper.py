"""`blkcache install-helper` and the helper search (issue 11.1).

Installs go to scratch prefixes under /run (root's, 0755, not searched)
except where the search itself is tested: there the helper goes to
/usr/local/libexec/blkcache, the place install-helper uses by default, and a
fixture removes it again (and /usr/local/libexec when it created it).
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

from blkcache import privilege
from blkcache.integrations import helper_install

import cliproc
import kernel
import needs
import srctree
from unprivileged import ENV, SETPRIV, cached_loop, node_mode

NOBODY = pwd.getpwnam("nobody")
HELPER = privilege.HELPER_NAME


@pytest.fixture
def prefix():
    """A scratch prefix under /run: root's, 0755, removed afterwards."""
    path = tempfile.mkdtemp(prefix="blkcache-prefix-", dir="/run")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _mode(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)


def test_installs_root_owned_with_the_capability_whatever_the_umask(prefix):
    proc = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable, "-m",
                           "blkcache", "install-helper", "--prefix", prefix],
                          capture_output=True, text=True, env=cliproc.env(), check=False)
    target = os.path.join(prefix, "libexec", "blkcache", HELPER)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        f"create {prefix}/libexec (root:root 0755)",
        f"create {prefix}/libexec/blkcache (root:root 0755)",
        f"install {privilege.helper_path()} as {target} (root:root 0755, cap_sys_admin+p), "
        "atomically"]
    for directory in (f"{prefix}/libexec", f"{prefix}/libexec/blkcache"):
        assert _mode(directory) == (0, 0, "0o755")
    assert _mode(target) == (0, 0, "0o755")
    assert privilege.file_caps(target).text() == "cap_sys_admin=p"
    with open(target, "rb") as f, open(privilege.helper_path(), "rb") as g:
        assert f.read() == g.read()
    status = privilege.helper_status(target)
    assert status.trusted and status.usable and status.granted
    assert os.listdir(os.path.dirname(target)) == [HELPER]     # no temporary file left


def test_reinstalling_never_shows_a_helper_without_its_capability(prefix):
    first = helper_install.install(prefix)
    old = os.open(first.target, os.O_RDONLY | os.O_CLOEXEC)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(privilege.file_caps(first.target))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(30):
            again = helper_install.install(prefix)
    finally:
        stop.set()
        watcher.join()
    assert again.steps[-1].endswith("replacing the one there atomically")
    try:
        assert os.fstat(old).st_nlink == 0                      # replaced, not rewritten
    finally:
        os.close(old)
    assert seen and all(c is not None and c.has(privilege.CAP_SYS_ADMIN) for c in seen)
    assert os.listdir(os.path.dirname(first.target)) == [HELPER]


def test_dry_run_and_uninstall(prefix):
    code, out, err = cliproc.run("install-helper", "--prefix", prefix, "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"would create {prefix}/libexec (root:root 0755)"
    assert os.listdir(prefix) == []
    helper_install.install(prefix)
    target = os.path.join(prefix, "libexec", "blkcache", HELPER)
    code, out, err = cliproc.run("install-helper", "--prefix", prefix, "--uninstall",
                                 "--dry-run")
    assert (code, err) == (0, "") and out.startswith(f"would remove {target}\n")
    assert os.path.exists(target)
    code, out, err = cliproc.run("install-helper", "--prefix", prefix, "--uninstall")
    assert (code, err, out) == (0, "", f"remove {target}\nremove the empty directory "
                                       f"{prefix}/libexec/blkcache\n")
    assert os.listdir(f"{prefix}/libexec") == []
    code, out, err = cliproc.run("install-helper", "--prefix", prefix, "--uninstall")
    assert (code, out) == (0, f"nothing to remove: no {target}\n")


@pytest.mark.parametrize("spoil, expected", [
    (lambda d: os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid),
     "owned by uid 65534, not root: its owner could replace the helper (fix: chown root {d}, "
     "or choose another --prefix)"),
    (lambda d: os.chmod(d, 0o775),
     "writable by group or others (mode 0775): they could replace the helper (fix: chmod "
     "go-w {d}, or choose another --prefix)"),
    (lambda d: os.chmod(d, 0o1777),
     "writable by group or others (mode 1777): they could replace the helper (fix: choose "
     "a --prefix outside it)"),
], ids=["owned by nobody", "group-writable", "sticky"])
def test_refuses_a_prefix_others_can_change(prefix, spoil, expected):
    libexec = os.path.join(prefix, "libexec")
    os.mkdir(libexec, 0o755)
    spoil(libexec)
    code, out, err = cliproc.run("install-helper", "--prefix", prefix)
    assert (code, out) == (5, "")
    assert cliproc.one_error_line(err) == f"blkcache: {libexec}: " + expected.format(d=libexec)
    assert os.listdir(libexec) == []                             # nothing created


def test_refuses_a_relative_prefix():
    code, out, err = cliproc.run("install-helper", "--prefix", "usr/local")
    assert (code, out) == (2, "")
    assert cliproc.one_error_line(err) == ("blkcache: --prefix must be an absolute path, "
                                           "not 'usr/local'")


def test_refuses_to_install_a_copy_others_could_have_changed(nobody, prefix):
    """Root running install-helper from a package another user can write would
    hand that user CAP_SYS_ADMIN."""
    st = os.stat(nobody.package)
    os.chown(nobody.package, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        proc = subprocess.run([nobody.python, "-s", "-B", "-m", "blkcache", "install-helper",
                               "--prefix", prefix], env=nobody.env, cwd="/",
                              capture_output=True, text=True, check=False)
    finally:
        os.chown(nobody.package, st.st_uid, st.st_gid)
    assert (proc.returncode, proc.stdout) == (5, "")
    assert proc.stderr == (
        f"blkcache: {nobody.helper}: refusing to install it: not trusted: {nobody.package} "
        "is owned by nobody (uid 65534), not root: a user who can change it could keep "
        "its capability and run any code with CAP_SYS_ADMIN (fix: install blkcache where "
        "only root can write, e.g. as root in a root-owned venv, and run its "
        "install-helper)\n")
    assert os.listdir(prefix) == []


def test_needs_root(nobody):
    proc = nobody.blkcache("install-helper")
    assert (proc.returncode, proc.stdout) == (5, "")
    assert proc.stderr == ("blkcache: install-helper needs root (it installs a root-owned "
                           "file with a file capability; try: sudo blkcache "
                           "install-helper)\n")
    assert not os.path.exists(f"/usr/local/libexec/blkcache/{HELPER}")


# -- the search: /usr/libexec/blkcache, /usr/local/libexec/blkcache, the package ----

SYSTEM = f"/usr/local/libexec/blkcache/{HELPER}"


@pytest.fixture
def system_helper():
    """install-helper's default: /usr/local/libexec/blkcache; removed afterwards."""
    if os.path.lexists(SYSTEM):
        pytest.fail(f"{SYSTEM} exists already: not touching someone else's helper")
    created_libexec = not os.path.exists("/usr/local/libexec")
    try:
        yield helper_install.install()
    finally:
        helper_install.uninstall()
        if created_libexec:
            os.rmdir("/usr/local/libexec")


def _as_nobody(*argv):
    return subprocess.run([*SETPRIV, "--", *argv], env=ENV, cwd="/", capture_output=True,
                          text=True, timeout=120, check=False)


def _nobody_drops(blkcache, loopdev):
    """nobody drops a 0644 loop device with --method helper: the cache empties.
    (Exit 3: the kernel will not tell nobody what remains on a node it cannot
    write; the oracle, as root, counts.)"""
    with node_mode(loopdev, 0o644):
        cached_loop(loopdev)
        proc = _as_nobody(blkcache, "drop", "--method", "helper", loopdev)
        assert (proc.returncode, proc.stderr) == (3, "")
        assert "dropped with BLKFLSBUF via blkcache-flush" in proc.stdout, proc.stdout
        assert kernel.cached_pages(loopdev) == 0


@pytest.fixture
def pip_venv(scratch_dir):
    """A venv of the system Python (nobody can run it) and a wheel of a clean copy
    of the source tree; (venv/bin/python, wheel)."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None or subprocess.run(
            [python, "-c", "import cffi, click, setuptools, wheel"], check=False,
            capture_output=True).returncode != 0:
        needs.missing("the system python3 with cffi, click, setuptools and wheel "
                      "(apt-get install python3-cffi python3-click python3-setuptools "
                      "python3-wheel)")
    os.chmod(scratch_dir, 0o755)
    src = srctree.clean_copy(os.path.join(scratch_dir, "src"))
    venv = os.path.join(scratch_dir, "venv")
    subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", venv],
                   check=True)
    vpython = os.path.join(venv, "bin", "python")
    wheels = os.path.join(scratch_dir, "wheels")
    proc = subprocess.run([vpython, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", wheels, src],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed: {proc.stderr[-2000:]}")
    [wheel] = os.listdir(wheels)
    return vpython, os.path.join(wheels, wheel)


def _pip_install(vpython, wheel, *extra):
    subprocess.run([vpython, "-m", "pip", "install", "-q", "--no-deps", *extra, wheel],
                   check=True, capture_output=True)


def test_a_system_helper_survives_pip_install_force_reinstall(pip_venv, system_helper,
                                                              loopdev):
    vpython, wheel = pip_venv
    _pip_install(vpython, wheel)
    blkcache = os.path.join(os.path.dirname(vpython), "blkcache")
    _nobody_drops(blkcache, loopdev)
    _pip_install(vpython, wheel, "--force-reinstall")
    proc = _as_nobody(vpython, "-c", "from blkcache import privilege; "
                                     "print(privilege.helper_path())")
    own = proc.stdout.strip()
    assert own.startswith(os.path.dirname(os.path.dirname(vpython)))
    assert privilege.file_caps(own) is None                 # pip's copy: no capability
    assert privilege.file_caps(SYSTEM).text() == "cap_sys_admin=p"
    _nobody_drops(blkcache, loopdev)
    report = json.loads(_as_nobody(blkcache, "doctor", "--json").stdout)
    assert report["helper"]["path"] == SYSTEM and report["helper"]["usable"] is True
    assert report["helpers"] == [
        {"path": f"/usr/libexec/blkcache/{HELPER}", "used": False,
         "why_not": f"{HELPER} is not installed (no /usr/libexec/blkcache/{HELPER})"},
        {"path": SYSTEM, "used": True, "why_not": None},
        {"path": own, "used": False,
         "why_not": f"{own} does not carry the file capability cap_sys_admin+p"}]


def test_the_first_trusted_helper_with_the_capability_is_used(nobody, system_helper,
                                                              loopdev):
    """Search order, and a system helper made changeable is passed over."""
    nobody.grant()
    try:
        report = json.loads(nobody.blkcache("doctor", "--json").stdout)
        assert report["helper"]["path"] == SYSTEM
        assert report["helpers"][2] == {"path": nobody.helper, "used": False,
                                        "why_not": f"{SYSTEM} comes first in the search "
                                                   "order"}
        directory = os.path.dirname(SYSTEM)
        os.chmod(directory, 0o777)
        try:
            report = json.loads(nobody.blkcache("doctor", "--json").stdout)
            text = nobody.blkcache("doctor").stdout
        finally:
            os.chmod(directory, 0o755)
        assert report["helper"]["path"] == nobody.helper and report["helper"]["usable"]
        why = report["helpers"][1]["why_not"]
        assert why.startswith(f"{SYSTEM} is not trusted: {directory} is writable by group "
                              "and others")
        assert f"  not used:    {SYSTEM}: {why}" in text.splitlines()
    finally:
        nobody.revoke()
