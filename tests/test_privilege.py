"""Capability checks, drop methods and doctor, run for real as nobody.

Loop device nodes are chmod'ed (and restored) so that nobody may read but
not write them (0644), read and write them (0666) or not open them (0600).
Page counts come from the raw cachestat(2) oracle in kernel.py, as root.
"""

import errno
import json
import os
import shutil
import struct
import subprocess

import pytest

from blkcache import privilege
from blkcache.errors import MethodUnavailableError

import cliproc
import kernel
import needs
import unprivileged
from units import MiB
from unprivileged import cached_loop, node_mode


def lines(text):
    return text.splitlines()


def test_nobody_runs_without_any_capability(nobody):
    proc = nobody.py("import os; from blkcache import caps, privilege; "
                     "print(os.geteuid(), caps.effective_caps(), privilege.no_new_privs())")
    assert (proc.returncode, proc.stdout) == (0, "65534 0 False\n"), proc.stderr


# -- without the helper's capability ---------------------------------------------------

def test_forced_ioctl_fails_cleanly(nobody, loopdev):
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        proc = nobody.blkcache("drop", "--method", "ioctl", loopdev)
        assert proc.returncode == 5
        assert proc.stdout == ""
        assert lines(proc.stderr) == [
            f"blkcache: {loopdev}: BLKFLSBUF needs CAP_SYS_ADMIN, which this process lacks "
            "(fix: run as root (CAP_SYS_ADMIN), or let this user drop through the helper: "
            f"as root, setcap cap_sys_admin+p {nobody.helper}, then use --method helper "
            "or auto)"]
        kernel.not_dropped(loopdev.fd, before)


def test_forced_helper_without_capability_gives_the_setcap_command(nobody, loopdev):
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        proc = nobody.blkcache("drop", "--method", "helper", loopdev)
        assert proc.returncode == 5
        assert lines(proc.stderr) == [
            f"blkcache: {loopdev}: blkcache-flush cannot flush: {nobody.helper} does not "
            "carry the file capability cap_sys_admin+p "
            f"(fix: setcap cap_sys_admin+p {nobody.helper})"]
        kernel.not_dropped(loopdev.fd, before)


def test_auto_falls_back_to_fadvise_and_says_so(nobody, loopdev):
    with node_mode(loopdev, 0o666):
        before = cached_loop(loopdev)
        proc = nobody.blkcache("drop", loopdev)
        assert proc.returncode == 0, proc.stderr
        first = lines(proc.stdout)[0]
        assert first.startswith(f"{loopdev}: ") and " -> 0 pages cached (" in first, first
        kernel.reported_before_drop(before, int(first.split()[1]))
        assert "dropped with posix_fadvise" in proc.stdout
        [warning] = lines(proc.stderr)
        assert warning.startswith(f"blkcache: warning: {loopdev}: BLKFLSBUF unavailable, "
                                  "dropping with posix_fadvise: no CAP_SYS_ADMIN and no "
                                  "usable blkcache-flush (")
        assert "posix_fadvise(DONTNEED) drops only clean, unmapped pages" in warning
        assert warning.endswith(f"; fix: setcap cap_sys_admin+p {nobody.helper}")
        assert kernel.cached_pages(loopdev) == 0
        # JSON says which method ran, and carries the warning too.
        cached_loop(loopdev)
        proc = nobody.blkcache("drop", "--json", loopdev)
        assert proc.returncode == 0
        [record] = json.loads(proc.stdout)["devices"]
        assert record["method"] == "fadvise"
        assert record["after"]["cached"] == 0 and record["complete"] is True
        assert record["warning"].startswith("BLKFLSBUF unavailable")
        # --quiet prints nothing, the exit status still tells.
        cached_loop(loopdev)
        proc = nobody.blkcache("drop", "--quiet", loopdev)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_auto_fallback_exit_status_follows_the_verification(nobody, loopdev):
    # nobody may read the node but not write it: the drop works, but the
    # kernel will not say what is left, so the answer is "unknown" (3).
    with node_mode(loopdev, 0o644):
        cached_loop(loopdev)
        proc = nobody.blkcache("drop", loopdev)
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout == (f"{loopdev}: dropped with posix_fadvise; the kernel will not "
                               "tell this user whether pages remain (unknown)\n")
        assert "warning" in proc.stderr
        assert kernel.cached_pages(loopdev) == 0


# -- with the helper's capability ------------------------------------------------------

def test_auto_uses_the_helper_and_empties_the_cache(granted, loopdev):
    with node_mode(loopdev, 0o666):
        before = cached_loop(loopdev)
        proc = granted.blkcache("drop", "--json", loopdev)
        assert (proc.returncode, proc.stderr) == (0, "")
        [record] = json.loads(proc.stdout)["devices"]
        assert record["method"] == "helper"
        assert record["warning"] is None
        kernel.reported_before_drop(before, record["before"]["cached"])
        assert record["after"]["cached"] == 0
        assert kernel.cached_pages(loopdev) == 0
        # With the helper usable, a forced ioctl points at it.
        proc = granted.blkcache("drop", "--method", "ioctl", loopdev)
        assert proc.returncode == 5
        assert proc.stderr.endswith("(fix: run as root (CAP_SYS_ADMIN), or use --method "
                                    "helper or auto: blkcache-flush carries "
                                    "cap_sys_admin+p)\n")


def test_forced_helper_on_a_node_the_user_can_only_read(granted, loopdev):
    with node_mode(loopdev, 0o644):
        cached_loop(loopdev)
        proc = granted.blkcache("drop", "--method", "helper", loopdev)
        assert (proc.returncode, proc.stderr) == (3, "")
        assert proc.stdout == (f"{loopdev}: dropped with BLKFLSBUF via blkcache-flush; the "
                               "kernel will not tell this user whether pages remain "
                               "(unknown)\n")
        assert kernel.cached_pages(loopdev) == 0


def test_helper_route_refuses_a_node_the_user_cannot_open(granted, loopdev):
    with node_mode(loopdev, 0o600):
        before = cached_loop(loopdev)
        for method in ("auto", "helper"):
            proc = granted.blkcache("drop", "--method", method, loopdev)
            assert proc.returncode == 5
            assert lines(proc.stderr) == [f"blkcache: {loopdev}: Permission denied"]
            kernel.not_dropped(loopdev.fd, before)


def test_helper_is_not_used_for_a_range(granted, loopdev):
    with node_mode(loopdev, 0o666):
        cached_loop(loopdev)
        proc = granted.blkcache("drop", "--method", "helper", "--length", "1M", loopdev)
        assert proc.returncode == 5
        assert "BLKFLSBUF drops the whole device, not a range" in proc.stderr
        proc = granted.blkcache("drop", "--json", "--length", "4M", loopdev)
        assert proc.returncode == 0
        assert json.loads(proc.stdout)["devices"][0]["method"] == "fadvise"
        assert kernel.cached_pages(loopdev, 0, 4 * MiB) == 0


def test_api_helper_method_as_nobody(granted, loopdev):
    """The Python API, not the CLI: Target.drop(method="helper") on its own fd."""
    code = ("import sys, blkcache\n"
            "r = blkcache.drop(sys.argv[1], method='helper')\n"
            "print(r.method, r.before.cached, r.after.cached, r.attempts)\n")
    with node_mode(loopdev, 0o666):
        before = cached_loop(loopdev)
        proc = granted.py(code, loopdev)
        assert (proc.returncode, proc.stderr) == (0, "")
        method, reported, after, attempts = proc.stdout.split()
        assert (method, after, attempts) == ("helper", "0", "1")
        kernel.reported_before_drop(before, int(reported))
        # The kernel's word, not blkcache's: the cache is empty.
        assert kernel.cached_pages(loopdev) == 0


# -- status and verify as a user who cannot write the node -------------------------------

@pytest.mark.parametrize("interface", ["cachestat", "mincore"])
def test_status_and_verify_say_unknown_never_a_count(nobody, loopdev, interface):
    with node_mode(loopdev, 0o644):
        cached = cached_loop(loopdev)
        # With the kernel's raw answer: mincore would claim every page.
        proc = nobody.blkcache("status", "--interface", interface, loopdev)
        assert proc.returncode == 3, proc.stderr
        assert lines(proc.stdout)[1].split() == ["?", "?", "64M", "?", "?", loopdev]
        proc = nobody.blkcache("status", "--json", "--interface", interface, loopdev)
        assert proc.returncode == 3
        [record] = json.loads(proc.stdout)["devices"]
        assert record["cached"] is None and record["exact"] is False
        assert record["interface"] == interface
        proc = nobody.blkcache("verify", "--interface", interface, loopdev)
        assert proc.returncode == 3
        assert proc.stdout.startswith(f"{loopdev}: unknown: the kernel does not report")
        kernel.not_dropped(loopdev.fd, cached)


def test_mincore_really_lies_to_nobody(nobody, loopdev):
    """Why "unknown" is needed: raw mincore(2) as nobody claims every page."""
    code = ("import mmap, os, sys, ctypes\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,\n"
            "                      ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
            "addr = libc.mmap(None, 1 << 20, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)\n"
            "vec = (ctypes.c_ubyte * 256)()\n"
            "assert libc.mincore(ctypes.c_void_p(addr), 1 << 20, vec) == 0\n"
            "print(sum(v & 1 for v in vec))\n")
    with node_mode(loopdev, 0o644):
        os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert kernel.cached_pages(loopdev, 0, MiB) == 0
        proc = nobody.py(code, loopdev)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "256\n"      # 256 of 256 "resident", while 0 are


# -- doctor -------------------------------------------------------------------------------

def doctor_json(runner, *args, **kwargs):
    proc = runner.blkcache("doctor", "--json", *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_doctor_as_nobody_without_the_capability(nobody, loopdev):
    with node_mode(loopdev, 0o644):
        report = doctor_json(nobody, loopdev)
        assert report["kernel"] == os.uname().release
        assert report["cachestat_available"] is True          # Linux 6.18 here
        assert (report["uid"], report["user"]) == (65534, "nobody")
        assert report["effective_caps"] == [] and report["cap_sys_admin"] is False
        helper = report["helper"]
        assert helper["path"] == nobody.helper and helper["installed"] is True
        assert helper["capabilities"] is None and helper["usable"] is False
        assert helper["fix"] == f"setcap cap_sys_admin+p {nobody.helper}"
        assert report["drop_method"]["method"] == "fadvise"
        assert report["setcap_command"] == f"setcap cap_sys_admin+p {nobody.helper}"
        [device] = report["devices"]
        assert device == {"path": loopdev, "opened": True, "error": None, "kind": "block",
                          "cachestat": "refused", "mincore": "refused", "answers": False,
                          "drop_method": "fadvise"}
        subjects = [p["subject"] for p in report["problems"]]
        assert subjects == ["drop", loopdev] and report["ok"] is False
        assert "setfacl -m u:nobody:rw" in report["problems"][1]["fix"]
        # The human form says the same, and ends with the install command.
        proc = nobody.blkcache("doctor", loopdev)
        assert proc.returncode == 0
        out = lines(proc.stdout)
        assert f"helper:        {nobody.helper} (no file capability, not usable)" in out
        assert out[-2:] == ["To let users without CAP_SYS_ADMIN drop with BLKFLSBUF, run "
                            "as root:", f"  setcap cap_sys_admin+p {nobody.helper}"]
        assert any(line.startswith(f"device:        {loopdev}: block; cachestat refused, "
                                   "mincore refused: status/verify give \"unknown\"")
                   for line in out)


def test_doctor_as_nobody_with_the_capability(granted, loopdev):
    with node_mode(loopdev, 0o666):
        report = doctor_json(granted, loopdev)
        assert report["helper"]["capabilities"] == "cap_sys_admin=p"
        assert report["helper"]["usable"] is True and report["helper"]["problem"] is None
        assert report["helper"]["granted"] is True
        assert report["drop_method"]["method"] == "helper"
        [device] = report["devices"]
        assert device["cachestat"] == device["mincore"] == "answers"
        assert device["answers"] is True and device["drop_method"] == "helper"
        assert report["problems"] == [] and report["ok"] is True
        proc = granted.blkcache("doctor")
        assert "problems:      none" in proc.stdout
        assert "setcap" not in proc.stdout


def test_doctor_agrees_with_the_kernel_under_no_new_privs(granted, loopdev):
    """no_new_privs voids file capabilities on exec: doctor and drop know it."""
    report = doctor_json(granted, setpriv_extra=["--no-new-privs"])
    assert report["no_new_privs"] is True
    assert report["helper"]["cap_sys_admin"] is True
    assert report["helper"]["granted"] is False and report["helper"]["usable"] is False
    assert "no_new_privs" in report["helper"]["problem"]
    assert report["drop_method"]["method"] == "fadvise"
    with node_mode(loopdev, 0o644):
        before = cached_loop(loopdev)
        # The kernel agrees.  (Through sh: setpriv itself still holds root's
        # permitted set when it execs, so no_new_privs would see no gain.)
        proc = granted.run("sh", "-c", 'exec "$0" "$1"', granted.helper, loopdev,
                           setpriv_extra=["--no-new-privs"])
        assert proc.returncode == 1 and "CAP_SYS_ADMIN is not permitted" in proc.stderr
        kernel.not_dropped(loopdev.fd, before)
        proc = granted.blkcache("drop", "--method", "helper", loopdev,
                                setpriv_extra=["--no-new-privs"])
        assert proc.returncode == 5 and "no_new_privs" in proc.stderr
        kernel.not_dropped(loopdev.fd, before)


def test_doctor_names_a_node_the_user_cannot_open(nobody, loopdev):
    with node_mode(loopdev, 0o600):
        report = doctor_json(nobody, loopdev, "/dev/null")
        first, second = report["devices"]
        assert first["opened"] is False and first["error"] == "Permission denied"
        assert second["error"] == "not a block device or regular file (a character device)"
        fixes = {p["subject"]: p["fix"] for p in report["problems"]}
        assert fixes[loopdev].startswith("let nobody read the node")


def test_doctor_as_root(loopdev):
    from blkcache.doctor import doctor

    report = doctor([loopdev])
    assert report.cap_sys_admin is True
    assert report.drop_method.method == "ioctl"
    assert report.devices[0].answers is True and report.devices[0].drop_method == "ioctl"
    assert report.problems == ()
    proc = cliproc.completed("doctor", "--helper-path")
    assert (proc.returncode, proc.stdout) == (0, privilege.helper_path() + "\n")


def test_doctor_rejects_bad_usage():
    proc = cliproc.completed("doctor", "--bogus")
    assert proc.returncode == 2 and proc.stderr.startswith("blkcache: No such option")


# -- file capabilities, read back from real files ------------------------------------------

def test_file_caps_match_setcap(loop_available, scratch_dir):
    path = os.path.join(scratch_dir, "blkcache-flush")
    shutil.copy2(privilege.helper_path(), path)
    assert privilege.file_caps(path) is None
    for grant, text, effective in [
            ("cap_sys_admin+p", "cap_sys_admin=p", False),
            ("cap_sys_admin+ep", "cap_sys_admin=ep", True),
            ("cap_fowner,cap_sys_admin+p", "cap_fowner,cap_sys_admin=p", False),
            ("cap_fowner+p", "cap_fowner=p", False)]:
        subprocess.run(["setcap", grant, path], check=True)
        caps = privilege.file_caps(path)
        assert caps.text() == text and caps.effective is effective
        assert caps.has(privilege.CAP_SYS_ADMIN) is ("sys_admin" in grant)
        status = privilege.helper_status(path, probe=False)
        assert status.cap_sys_admin is ("sys_admin" in grant)
        assert status.capabilities == text
    subprocess.run(["setcap", "-r", path], check=True)
    assert privilege.file_caps(path) is None


def test_decode_file_caps_rejects_garbage():
    v2 = struct.pack("<IIIII", 0x02000000, 1 << 21, 0, 0, 0)
    assert privilege.decode_file_caps(v2).has(21)
    v3 = struct.pack("<IIIIII", 0x03000001, 1 << 21, 0, 0, 0, 1000)
    caps = privilege.decode_file_caps(v3)
    assert caps.version == 3 and caps.rootid == 1000 and caps.effective
    for bad in (b"", b"\x00\x00\x00\x02", v2 + b"\x00", struct.pack("<IIIII", 0x07000000,
                                                                      0, 0, 0, 0)):
        with pytest.raises(ValueError):
            privilege.decode_file_caps(bad)


def test_nosuid_mount_makes_the_helper_unusable(nobody, loopdev, scratch_dir):
    """The kernel ignores file capabilities on a nosuid mount: so does blkcache."""
    mnt = os.path.join(scratch_dir, "nosuid")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,mode=0755,size=1m", "tmpfs", mnt],
                   check=True)
    try:
        path = os.path.join(mnt, "blkcache-flush")
        shutil.copy2(nobody.helper, path)
        subprocess.run(["setcap", "cap_sys_admin+p", path], check=True)
        os.chmod(scratch_dir, 0o755)
        status = privilege.helper_status(path, probe=False)
        assert status.cap_sys_admin is True and status.nosuid is True
        # Run as nobody, the probe finds that the kernel withholds it.
        code = ("import sys; from blkcache import privilege; "
                "s = privilege.helper_status(sys.argv[1]); "
                "print(s.granted, s.usable, 'nosuid' in s.problem)")
        proc = nobody.py(code, path)
        assert (proc.returncode, proc.stdout) == (0, "False False True\n"), proc.stderr
        with node_mode(loopdev, 0o644):
            before = cached_loop(loopdev)
            proc = nobody.run(path, loopdev)
            assert proc.returncode == 1 and "CAP_SYS_ADMIN is not permitted" in proc.stderr
            kernel.not_dropped(loopdev.fd, before)
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_root_may_not_force_an_ungranted_helper(loopdev):
    with pytest.raises(MethodUnavailableError) as info:
        import blkcache
        blkcache.drop(loopdev, method="helper")
    assert info.value.fix == privilege.setcap_command()


def test_the_helper_reports_its_errno_as_a_number(granted, loopdev):
    """Its stderr line is for people; the errno goes to stdout, where run_helper
    reads it (EPERM without the capability: MethodUnavailableError, not the
    HelperError of a failure without an errno)."""
    with node_mode(loopdev, 0o600):
        proc = granted.run(granted.helper, loopdev)
        assert (proc.returncode, proc.stdout) == (1, f"{errno.EACCES}\n")
        assert proc.stderr == f"blkcache-flush: {loopdev}: cannot open: Permission denied\n"
    code = ("import os, sys; from blkcache import privilege\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try:\n"
            "    privilege.run_helper(fd, sys.argv[1])\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc.fix == privilege.setcap_command())\n")
    granted.revoke()
    with node_mode(loopdev, 0o644):
        proc = granted.py(code, loopdev)
    assert (proc.returncode, proc.stdout) == (0, "MethodUnavailableError True\n"), proc.stderr


def test_demo_without_root_says_what_it_needs_and_attaches_nothing(nobody, scratch_dir):
    # Other runs attach loop devices meanwhile: strace tells what this one did.
    strace = needs.need_tool("strace", "strace")
    out = os.path.join(scratch_dir, "strace.out")
    proc = subprocess.run([strace, "-f", "-qq", "-e", "trace=execve,openat,mkdir",
                           "-o", out, "--", *unprivileged.SETPRIV, "--", nobody.python,
                           "-s", "-B", "-m", "blkcache", "demo"],
                          env=nobody.env, cwd="/", capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (5, "")
    assert lines(proc.stderr) == [
        "blkcache: demo needs root: it attaches loop devices with losetup "
        "(try: sudo blkcache demo)"]
    with open(out, encoding="utf-8") as f:
        trace = f.read()
    assert f'execve("{nobody.python}"' in trace         # it did trace the run
    for sign in ("losetup", "/dev/loop", "blkcache-demo-"):
        assert sign not in trace, [line for line in trace.splitlines() if sign in line]
