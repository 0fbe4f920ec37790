"""Run blkcache and its helper as a real unprivileged user (nobody).

The interpreter and site-packages here may live where nobody cannot reach
them (e.g. /root/.pyenv with /root mode 0700).  So the fixture copies what
is needed into a world-readable directory under /var/tmp: the blkcache
package as imported (with _native*.so and blkcache-flush), click, cffi and
_cffi_backend, and finds an interpreter of the same major.minor version that
nobody can execute.  setcap is only ever applied to that copy of the helper,
and removed again.
"""

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

import kernel
import needs

USER, GROUP = "nobody", "nogroup"
SETPRIV = ["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups",
           "--inh-caps=-all"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
REQUIRE = os.environ.get("BLKCACHE_REQUIRE_LOOP") == "1" or needs.REQUIRED


def _skip_or_fail(reason):
    """Skip; fail where the least-privilege tests are required (CI)."""
    if REQUIRE:
        pytest.fail(f"BLKCACHE_REQUIRE_LOOP=1 or BLKCACHE_REQUIRE_ALL=1 but {reason}",
                    pytrace=False)
    pytest.skip(reason)


def _module_dir(name):
    module = __import__(name)
    return os.path.dirname(os.path.abspath(module.__file__))


def _copy_tree(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _world_readable(root):
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


class Unprivileged:
    """A world-readable copy of blkcache and a way to run things as nobody."""

    def __init__(self, root, python):
        self.root = root
        self.python = python
        self.package = os.path.join(root, "blkcache")
        self.helper = os.path.join(self.package, "blkcache-flush")
        self.env = dict(ENV, PYTHONPATH=root)

    def run(self, *argv, timeout=60, pass_fds=(), setpriv_extra=(), **kwargs):
        """Run argv as nobody (no groups, no capabilities); a CompletedProcess."""
        return subprocess.run([*SETPRIV, *setpriv_extra, "--", *argv], env=self.env,
                              cwd="/", capture_output=True, text=True, timeout=timeout,
                              pass_fds=pass_fds, check=False, **kwargs)

    def py(self, code, *args, **kwargs):
        return self.run(self.python, "-s", "-B", "-c", code, *args, **kwargs)

    def blkcache(self, *args, **kwargs):
        return self.run(self.python, "-s", "-B", "-m", "blkcache", *args, **kwargs)

    def grant(self):
        subprocess.run(["setcap", "cap_sys_admin+p", self.helper], check=True,
                       capture_output=True)

    def revoke(self):
        subprocess.run(["setcap", "-r", self.helper], capture_output=True)


def _find_python(root):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/python{version}",
                  shutil.which(f"python{version}"), f"/usr/local/bin/python{version}"]
    probe = ("import sys, blkcache._native, click, blkcache.api; "
             "print('%d.%d' % sys.version_info[:2])")
    tried = []
    for python in dict.fromkeys(c for c in candidates if c):
        proc = subprocess.run([*SETPRIV, "--", python, "-s", "-B", "-c", probe],
                              env=dict(ENV, PYTHONPATH=root), cwd="/", capture_output=True,
                              text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return python, tried
        tried.append(f"{python}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return None, tried


def _no_system_helper():
    """The copy's helper is the one under test: drop and doctor look in the
    system locations first (blkcache.privilege.HELPER_DIRS)."""
    from blkcache import privilege

    for path in privilege.helper_candidates()[:-1]:
        if os.path.lexists(path):
            _skip_or_fail(f"{path} exists, and drop would use it rather than the copy "
                          "under test (remove it: apt-get purge blkcache, or blkcache "
                          "install-helper --uninstall)")


@contextlib.contextmanager
def unprivileged_copy():
    if os.geteuid() != 0:
        _skip_or_fail("running as another user needs root")
    for tool in ("setpriv", "setcap"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} is not installed")
    _no_system_helper()
    root = tempfile.mkdtemp(prefix="blkcache-nobody-", dir="/var/tmp")
    unpriv = None
    try:
        os.chmod(root, 0o755)
        package = _module_dir("blkcache")
        _copy_tree(package, os.path.join(root, "blkcache"))
        _copy_tree(_module_dir("click"), os.path.join(root, "click"))
        _copy_tree(_module_dir("cffi"), os.path.join(root, "cffi"))
        import _cffi_backend
        shutil.copy2(_cffi_backend.__file__, root)
        _world_readable(root)
        python, tried = _find_python(root)
        if python is None:
            _skip_or_fail(f"no Python {sys.version_info.major}.{sys.version_info.minor} that "
                        f"{USER} may run: {'; '.join(tried)}")
        unpriv = Unprivileged(root, python)
        if not os.path.exists(unpriv.helper):
            pytest.fail(f"{os.path.join(package, 'blkcache-flush')} was not built "
                        "(setup.py build_ext builds it)")
        yield unpriv
    finally:
        if unpriv is not None:
            unpriv.revoke()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def nobody():
    """An Unprivileged copy; the helper copy carries no capability."""
    with unprivileged_copy() as unpriv:
        yield unpriv


@pytest.fixture
def granted(nobody):
    """The helper copy granted cap_sys_admin+p for one test, then revoked."""
    nobody.grant()
    try:
        yield nobody
    finally:
        nobody.revoke()


@contextlib.contextmanager
def node_mode(device, mode):
    """chmod a loop device node we attached; restore its mode afterwards."""
    old = stat.S_IMODE(os.stat(device).st_mode)
    os.chmod(device, mode)
    try:
        yield device
    finally:
        os.chmod(device, old)


def cached_loop(loopdev, mib=16):
    """Fill loopdev's cache with a buffered read (root's fd); the page count.

    No readahead (POSIX_FADV_RANDOM on this fd): pages still locked by
    readahead in flight would survive a single drop and make tests flaky.
    """
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(loopdev.fd, 0, mib << 20)
    return kernel.count(loopdev.fd)      # the eviction stressor strikes after it
