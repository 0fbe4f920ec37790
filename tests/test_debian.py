"""The Debian package (issue 11.2), built, checked, installed and purged for real.

One module-scoped build of a clean copy of the tree (`dpkg-buildpackage -us
-uc -b`, about 6 s here), lintian, then one install with apt-get: getcap, the
files, `/usr/bin/blkcache status` as root and a helper drop as nobody, then a
purge that must leave nothing.  The purge also runs when a check fails.
"""

import glob
import os
import shutil
import subprocess

import pytest

from blkcache import _version

import kernel
import needs
import srctree
from unprivileged import ENV, SETPRIV, cached_loop, node_mode

HELPER = "/usr/libexec/blkcache/blkcache-flush"
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-q"]
VERSION = _version.__version__


def _installed():
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "blkcache"],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "installed" in proc.stdout


def _plant_artefacts(src):
    """What a developer's checkout may hold (pip install -e ., build_ext
    --inplace), each broken: were any of it packaged, status or the nobody
    drop below would fail."""
    broken_helper = "#!/bin/sh\nexit 0\n"        # "succeeds" without flushing
    for path, text in (("blkcache/blkcache-flush", broken_helper),
                       ("build/lib/blkcache/blkcache-flush", broken_helper),
                       ("blkcache/_native.abi3.so", "not a shared object"),
                       ("build/lib/blkcache/_native.abi3.so", "not a shared object")):
        path = os.path.join(src, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
        os.chmod(path, 0o755)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """(path of the .deb, build log): built from a clean copy of the tree."""
    needs.need_tool("dpkg-buildpackage", "dpkg-dev")
    needs.need_tool("dh", "debhelper")
    needs.need_tool("dh_python3", "dh-python")
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root")
    work = tmp_path_factory.mktemp("deb")
    src = srctree.clean_copy(str(work / "blkcache"))
    _plant_artefacts(src)
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arch = subprocess.run(["dpkg-architecture", "-qDEB_HOST_ARCH"], capture_output=True,
                          text=True, check=True).stdout.strip()
    path = str(work / f"blkcache_{VERSION}_{arch}.deb")
    assert os.path.exists(path), sorted(os.listdir(work))
    return path


def test_changelog_version_is_the_package_version():
    with open(os.path.join(srctree.SOURCE, "debian", "changelog"), encoding="utf-8") as f:
        assert f.readline().startswith(f"blkcache ({VERSION}) ")


def test_contents(deb):
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in (HELPER, "/usr/bin/blkcache", "/usr/share/man/man8/blkcache.8.gz",
                 "/usr/share/man/man8/blkcache-flush.8.gz",
                 "/usr/share/bash-completion/completions/blkcache",
                 "/usr/share/doc/blkcache/copyright",
                 "/usr/lib/python3/dist-packages/blkcache/hooks/qemu"):
        assert path in files, path
    assert any(p.startswith("/usr/lib/python3/dist-packages/blkcache/_native") for p in files)
    # One helper, outside the Python package; no hook enabled, nothing in /etc.
    assert [p for p in files if p.endswith("/blkcache-flush")] == [HELPER]
    helper = subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -xOf - .{HELPER}",
                            shell=True, capture_output=True, check=True).stdout
    assert helper.startswith(b"\x7fELF")               # built, not the planted script
    assert not [p for p in files if p.startswith("/etc/")]
    [helper_line] = [line for line in listing.splitlines() if line.endswith(HELPER)]
    assert helper_line.startswith("-rwxr-xr-x root/root ")


def test_lintian_reports_no_error(deb):
    lintian = needs.need_tool("lintian", "lintian")
    proc = subprocess.run([lintian, "--tag-display-limit", "0", deb], capture_output=True,
                          text=True, timeout=600, check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], proc.stdout


def _nobody(*argv):
    return subprocess.run([*SETPRIV, "--", *argv], env=ENV, cwd="/", capture_output=True,
                          text=True, timeout=120, check=False)


def _purge():
    subprocess.run([*APT, "purge", "blkcache"], capture_output=True, text=True, check=True)


def _postinst_without_setcap(tmp_path):
    """Without setcap, or when it fails: one line, exit 0, the package stays usable."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "setcap").write_text("#!/bin/sh\necho 'Failed to set capabilities' >&2\n"
                                 "exit 1\n")
    (fake / "setcap").chmod(0o755)
    postinst = "/var/lib/dpkg/info/blkcache.postinst"
    for path in ("/usr/bin:/bin", f"{fake}:/usr/sbin:/usr/bin:/sbin:/bin"):
        proc = subprocess.run(["sh", postinst, "configure", VERSION], capture_output=True,
                              text=True, env={"PATH": path, "LC_ALL": "C"}, check=False)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("blkcache:")]
        assert lines == [f"blkcache: cannot set cap_sys_admin+p on {HELPER}: drops by "
                         "non-root users will fall back to posix_fadvise"], proc.stderr


def test_install_use_and_purge(deb, loopdev, tmp_path):
    if _installed():
        pytest.fail("blkcache is installed as a package already: not touching it")
    needs.need_tool("getcap", "libcap2-bin")
    proc = subprocess.run([*APT, "install", deb], capture_output=True, text=True,
                          timeout=600, check=False)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "fall back" not in proc.stderr
        getcap = subprocess.run(["getcap", HELPER], capture_output=True, text=True,
                                check=True).stdout
        assert getcap.split() == [HELPER, "cap_sys_admin=p"]
        st = os.stat(HELPER)
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, 0, "0o755")
        # The command as root, through the system python3: it counts what the
        # oracle counts (bounded by readings around it: reclaim never stops).
        high = cached_loop(loopdev, mib=4)
        status = subprocess.run(["/usr/bin/blkcache", "status", loopdev], cwd="/",
                                capture_output=True, text=True, check=False)
        low = kernel.cached_pages(loopdev)
        assert (status.returncode, status.stderr) == (0, ""), status.stderr
        header, row = status.stdout.splitlines()
        assert header.split() == ["RES", "PAGES", "SIZE", "DIRTY", "WRITEBACK", "DEVICE"]
        assert row.split()[-1] == loopdev and high >= int(row.split()[1]) >= low > 0
        # nobody drops through the system helper, found first.
        doctor = _nobody("/usr/bin/blkcache", "doctor")
        assert f"helper:        {HELPER} (cap_sys_admin=p, usable)" in doctor.stdout, \
            doctor.stdout + doctor.stderr
        with node_mode(loopdev, 0o644):
            cached_loop(loopdev)
            drop = _nobody("/usr/bin/blkcache", "drop", "--method", "helper", loopdev)
            assert (drop.returncode, drop.stderr) == (3, "")    # 3: nobody may not count
            assert "dropped with BLKFLSBUF via blkcache-flush" in drop.stdout
            assert kernel.cached_pages(loopdev) == 0
        completion = subprocess.run(
            ["bash", "-c", ". /usr/share/bash-completion/completions/blkcache && "
                           "complete -p blkcache"], capture_output=True, text=True)
        assert completion.stdout.strip().endswith("-F _blkcache_completion blkcache")
        words = subprocess.run(["/usr/bin/blkcache"], capture_output=True, text=True,
                               env=dict(ENV, _BLKCACHE_COMPLETE="bash_complete",
                                        COMP_WORDS="blkcache inst", COMP_CWORD="1"))
        assert words.stdout.splitlines() == ["plain,install-helper"]
        _postinst_without_setcap(tmp_path)
    finally:
        _purge()
    assert not _installed()
    assert not os.path.lexists("/usr/libexec/blkcache")
    assert not os.path.lexists("/usr/bin/blkcache")
    assert glob.glob("/usr/lib/python3/dist-packages/blkcache*") == []
    assert not os.path.lexists("/usr/share/bash-completion/completions/blkcache")


def test_postinst_honours_dpkg_statoverride(deb):
    """An administrator's override keeps the helper without capability."""
    if _installed():
        pytest.fail("blkcache is installed as a package already: not touching it")
    subprocess.run(["dpkg-statoverride", "--add", "root", "root", "0755", HELPER],
                   check=True)
    try:
        proc = subprocess.run([*APT, "install", deb], capture_output=True, text=True,
                              timeout=600, check=False)
        try:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert shutil.which("getcap")
            getcap = subprocess.run(["getcap", HELPER], capture_output=True, text=True,
                                    check=True).stdout
            assert getcap == ""
        finally:
            _purge()
    finally:
        subprocess.run(["dpkg-statoverride", "--remove", HELPER], check=True)
    assert not os.path.lexists(HELPER)
