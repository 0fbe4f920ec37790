"""The libvirt qemu hook, installed under a scratch root and fed domain XML,
on real loop devices.  (tests/test_libvirt.py has libvirtd itself run it.)"""

import os
import re
import stat
import subprocess
import sys

import pytest

from blkcache.integrations import libvirt

import cliproc
import kernel
from needs import missing
from units import PAGE, MiB

DOMAIN = """<domain type='qemu'>
  <name>guest1</name>
  <metadata>
    <app:volumes xmlns:app='http://example.org/app'>
      <disk type='block'><source dev='{meta}'/></disk>
    </app:volumes>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source dev='{0}'/>
      <backingStore type='block'><source dev='{meta}'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='{file}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='{1}'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='block' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/blkcache-test-no-such-volume'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='{relative}'/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='{file}'/>
      <target dev='vdf' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='{meta}'><host name='127.0.0.1' port='10809'/></source>
      <target dev='vdg' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


@pytest.fixture
def installed(tmp_path):
    """The hook as --install writes it, under a scratch root."""
    path, _ = libvirt.install(root=str(tmp_path / "root"))
    return path


def run_hook(hook, args, xml, env=None, cwd=None):
    proc = subprocess.run([hook, *args], input=xml, capture_output=True, text=True,
                          env=env if env is not None else {"PATH": "/usr/bin:/bin"},
                          cwd=cwd, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def planted(loops, count, pages=64):
    """``count`` loop devices with ``pages`` cached pages each, held open."""
    devs, fds = [], []
    for _ in range(count):
        dev = loops.attach(size=16 * MiB)
        fd = loops.hold(dev)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        kernel.fill(fd, 0, pages * PAGE)
        devs.append(dev)
        fds.append(fd)
    return devs, fds


@pytest.fixture
def volumes(loops, tmp_path):
    """d1 (stale: a source wrote through another loop on its image), d2, and
    ``meta``, named only in <metadata>, <backingStore> and a network disk;
    a regular file named as a block disk, and a relative path to d2."""
    image = loops.image(16 * MiB)
    source, d1 = loops.attach(image), loops.attach(image)
    fd1 = loops.hold(d1)
    os.posix_fadvise(fd1, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(fd1, 0, 64 * PAGE)
    (d2, meta), (fd2, fd_meta) = planted(loops, 2)
    src_fd = loops.hold(source, os.O_RDWR)
    os.pwrite(src_fd, b"new!" * (8 * PAGE // 4), 4 * PAGE)      # pages 4-11 of d1 stale
    os.fsync(src_fd)
    file = tmp_path / "image.raw"
    file.write_bytes(b"f" * (64 * PAGE))
    ffd = os.open(file, os.O_RDONLY)
    kernel.fill(ffd, 0, 64 * PAGE)
    xml = DOMAIN.format(d1, d2, meta=meta, file=file, relative=os.path.relpath(d2, "/"))
    yield {"d1": d1, "d2": d2, "meta": meta, "file": str(file), "xml": xml,
           "fds": {"d1": fd1, "d2": fd2, "meta": fd_meta, "file": ffd}}
    os.close(ffd)


def cached(vols):
    """The oracle's readings (then a strike of the eviction stressor; d1 is spared:
    its stale pages are what the hook must find)."""
    return {name: kernel.count(fd, stress=0 if name == "d1" else None)
            for name, fd in vols["fds"].items()}


@pytest.mark.parametrize("event", [("migrate", "begin", "-"), ("prepare", "begin", "-"),
                                   ("start", "begin", "-"), ("started", "begin", "-")])
def test_hook_drops_exactly_the_domains_block_devices(installed, volumes, event):
    before = cached(volumes)
    proc = run_hook(installed, ["guest1", *event], volumes["xml"], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""          # "migrate begin": empty output = XML unchanged
    fds = volumes["fds"]
    assert [kernel.cachestat(fds[k])["nr_cache"] for k in ("d1", "d2")] == [0, 0]
    # Named only in <metadata>, <backingStore>, a network disk, or as a file: untouched.
    kernel.not_dropped(fds["meta"], before["meta"], what="a device in <metadata> was dropped")
    kernel.not_dropped(fds["file"], before["file"], what="a regular file was dropped")
    d1, d2 = volumes["d1"], volumes["d2"]
    op = " ".join(event[:2])
    lines = proc.stderr.splitlines()
    assert all(line.startswith(f"blkcache-hook: guest1 {op}: ") for line in lines), lines
    text = proc.stderr
    assert "/dev/blkcache-test-no-such-volume: does not exist" in text
    assert f"{os.path.relpath(d2, '/')}: not an absolute path; skipped" in text
    assert f"{volumes['file']}: not a block device; skipped" in text
    assert f"2 block devices: {d1} {d2}\n" in text
    stale = re.search(rf"^blkcache-hook: guest1 {op}: {d1}: stale: (\d+) of (\d+) compared "
                      r"pages differ from the device; stale offset (\d+) ",
                      text, re.M)
    assert stale, text
    assert 6 <= int(stale[1]) <= 8 and 4 * PAGE <= int(stale[3]) <= 6 * PAGE
    kernel.reported_before_drop(before["d1"], int(stale[2]), d1)
    matched = re.search(rf": {d2}: coherent: (\d+) cached pages match the device\n", text)
    assert matched, text
    kernel.reported_before_drop(before["d2"], int(matched[1]), d2)
    dropped = re.search(rf": {d1}: (\d+) -> 0 pages cached", text)
    assert dropped, text
    kernel.reported_before_drop(before["d1"], int(dropped[1]), d1)
    assert volumes["meta"] not in text
    assert "dropped and verified in" in lines[-1]


@pytest.mark.parametrize("event", [("stopped", "end", "-"), ("release", "end", "-"),
                                   ("migrate", "end", "-"), ("reconnect", "begin", "-")])
def test_other_events_touch_nothing(installed, volumes, event):
    before = cached(volumes)
    proc = run_hook(installed, ["guest1", *event], volumes["xml"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    for name, fd in volumes["fds"].items():
        kernel.not_dropped(fd, before[name], what=f"{name} was dropped")


def test_dirty_pages_on_the_destination_abort(installed, loops):
    dev = loops.attach(size=16 * MiB)
    wfd = loops.hold(dev, os.O_RDWR)
    os.pwrite(wfd, b"x" * PAGE, 0)
    xml = f"<domain><devices><disk type='block'><source dev='{dev}'/></disk></devices></domain>"
    proc = run_hook(installed, ["guest1", "migrate", "begin", "-"], xml)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"{dev}: dirty: 0 cached pages match the device, 1 dirty pages not compared" \
        in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("blkcache-hook: guest1 migrate begin: page "
                                            "cache not dropped; refusing migrate")
    assert kernel.cachestat(wfd)["nr_dirty"] == 1      # nothing written, nothing dropped


def test_bad_xml_and_no_disks(installed, loopdev):
    proc = run_hook(installed, ["guest1", "migrate", "begin", "-"], "<domain>")
    assert proc.returncode == 1 and "cannot parse the domain XML" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    proc = run_hook(installed, ["guest1", "prepare", "begin", "-"],
                    f"<disk type='block'><source dev='{loopdev}'/></disk>")
    assert proc.returncode == 1 and "root element is <disk>" in proc.stderr
    proc = run_hook(installed, ["guest1", "prepare", "begin", "-"],
                    "<domain><devices/></domain>")
    assert (proc.returncode, proc.stdout) == (0, "")
    assert "no block device to drop" in proc.stderr
    proc = run_hook(installed, ["guest1"], "<domain/>")
    assert proc.returncode == 1 and "usage:" in proc.stderr


def test_log_lines_are_escaped(installed):
    evil = "/dev/no&#10;such&#x2028;&#x85;x"      # newline, line separator, NEL
    xml = (f"<domain><devices><disk type='block'><source dev='{evil}'/></disk>"
           "</devices></domain>")
    proc = run_hook(installed, ["guest\nname", "prepare", "begin", "-"], xml)
    assert proc.returncode == 0
    assert proc.stderr.split("\n") == [
        "blkcache-hook: guest\\nname prepare begin: /dev/no\\nsuch\\u2028\\x85x: "
        "does not exist (no page cache to drop); skipped",
        "blkcache-hook: guest\\nname prepare begin: no block device to drop", ""]


def test_hook_runs_its_own_blkcache_whatever_path_pythonpath_and_cwd(installed, loopdev,
                                                                      tmp_path):
    """A `blkcache` on PATH, a blkcache package on PYTHONPATH and in the current
    directory: the hook uses none of them, only the package it was installed from."""
    trap = tmp_path / "trap"
    (trap / "blkcache" / "integrations").mkdir(parents=True)
    marker = tmp_path / "hijacked"
    code = f"open({str(marker)!r}, 'w').close()\n"
    (trap / "blkcache" / "__init__.py").write_text(code)
    (trap / "blkcache" / "integrations" / "__init__.py").write_text(code)
    (trap / "blkcache" / "integrations" / "libvirt.py").write_text(
        code + "def main(argv):\n    return 0\n")
    (trap / "blkcache-cmd").write_text(f"#!/bin/sh\n{sys.executable} -c \"{code}\"\n")
    os.chmod(trap / "blkcache-cmd", 0o755)
    os.symlink(trap / "blkcache-cmd", trap / "blkcache" / "blkcache")
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(loopdev.fd, 0, 64 * PAGE)
    xml = f"<domain><devices><disk type='block'><source dev='{loopdev}'/></disk></devices></domain>"
    env = {"PATH": f"{trap / 'blkcache'}:/usr/bin:/bin", "PYTHONPATH": str(trap),
           "PYTHONHOME": str(trap), "PYTHONSTARTUP": str(trap / "blkcache" / "__init__.py")}
    proc = run_hook(installed, ["guest1", "start", "begin", "-"], xml, env=env, cwd=trap)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert kernel.cachestat(loopdev.fd)["nr_cache"] == 0
    assert "dropped and verified" in proc.stderr


def test_install_writes_an_executable_root_owned_script_atomically(tmp_path, loop_available):
    """(loop_available: as root, like the loop tests; `-m "not loop"` runs as anyone.)"""
    root = tmp_path / "root"
    legacy = root / "etc/libvirt/hooks/qemu"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("#!/bin/sh\n# someone else's hook\n")
    path, notes = libvirt.install(root=str(root))
    assert path == str(root / "etc/libvirt/hooks/qemu.d/blkcache")
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o755 and (info.st_uid, info.st_gid) == (0, 0)
    assert os.listdir(os.path.dirname(path)) == ["blkcache"]       # no temporary left
    with open(path) as f:
        text = f.read()
    assert text == libvirt.hook_script()
    assert text.startswith(f"#!{sys.executable} -I\n")
    assert repr(cliproc.PKG_PARENT) in text
    assert legacy.read_text() == "#!/bin/sh\n# someone else's hook\n"
    assert any("restart libvirtd" in note for note in notes)
    assert any(str(legacy) in note and "left untouched" in note for note in notes)
    # Again: replaced in place, still one file.
    os.chmod(path, 0o600)
    libvirt.install(root=str(root))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert os.listdir(os.path.dirname(path)) == ["blkcache"]
    assert libvirt.uninstall(root=str(root)) == (path, True)
    assert libvirt.uninstall(root=str(root)) == (path, False)
    assert legacy.exists()
    # An older blkcache hook there would run too: said; a FIFO there blocks nothing.
    legacy.write_text("#!/bin/sh\nexec blkcache drop --expect-clean /dev/x\n")
    _, notes = libvirt.install(root=str(root))
    assert any("older blkcache hook: remove it" in note for note in notes), notes
    legacy.unlink()
    os.mkfifo(legacy)
    _, notes = libvirt.install(root=str(root))
    assert any("left untouched" in note and "older" not in note for note in notes), notes


def test_install_warns_when_others_than_root_can_change_what_root_runs(tmp_path,
                                                                        loop_available):
    python = tmp_path / "python3"
    python.write_text("")
    os.chown(python, 65534, 65534)
    path, notes = libvirt.install(root=str(tmp_path / "root"), python=str(python))
    assert notes[0] == (f"{python} (uid 65534, mode 0644) can be changed by others than "
                        "root, and libvirtd runs the hook as root with it")
    _, notes = libvirt.install(root=str(tmp_path / "root"))
    assert not any("can be changed" in note for note in notes), notes


def test_install_refuses_an_interpreter_a_shebang_cannot_name(tmp_path):
    for python in ("python3", "/opt/my python/bin/python3", "/x" * 150):
        with pytest.raises(libvirt.InstallError, match="absolute path without blanks"):
            libvirt.install(root=str(tmp_path), python=python)
    assert not (tmp_path / "etc/libvirt/hooks/qemu.d/blkcache").exists()


def test_cli_prints_the_hook_and_its_path():
    code, out, err = cliproc.run("hook", "libvirt")
    assert (code, err) == (0, "")
    assert out == libvirt.hook_script()
    code, out, err = cliproc.run("hook", "libvirt", "--path")
    assert (code, out, err) == (0, "/etc/libvirt/hooks/qemu.d/blkcache\n", "")
    code, out, err = cliproc.run("hook", "--help")
    assert code == 0 and "--install" in out and "--uninstall" in out


def test_cli_installs_and_uninstalls_the_hook(tmp_path, loop_available):
    """The real /etc/libvirt path, in a private mount namespace where it is a
    scratch directory: nothing of the machine's /etc is touched."""
    if not os.path.isdir("/etc/libvirt"):
        missing("/etc/libvirt does not exist (apt-get install libvirt-daemon-system)")
    etc = tmp_path / "etc-libvirt"
    (etc / "hooks").mkdir(parents=True)
    (etc / "hooks" / "qemu").write_text("#!/bin/sh\n")
    blkcache = f"{sys.executable} -m blkcache hook libvirt"
    script = f"""set -e
mount --bind {etc} /etc/libvirt
{blkcache} --install; echo "rc=$?"
stat -c '%U:%G %a' /etc/libvirt/hooks/qemu.d/blkcache
{blkcache} --uninstall; {blkcache} --uninstall
mount -o remount,bind,ro /etc/libvirt
{blkcache} --install || echo "rc=$?"
"""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=cliproc.env(), timeout=120)
    hook = "/etc/libvirt/hooks/qemu.d/blkcache"
    assert proc.stdout.splitlines() == [
        f"installed {hook}",
        "note: libvirtd reads its hooks when it starts: restart libvirtd (or virtqemud) "
        "for this hook to run",
        f"note: /etc/libvirt/hooks/qemu exists and was left untouched; libvirt runs it "
        f"before {hook}",
        "rc=0",
        "root:root 755",
        f"removed {hook}",
        f"{hook}: not installed",
        "rc=5"], proc.stdout + proc.stderr
    assert cliproc.one_error_line(proc.stderr) == \
        f"blkcache: {hook}: cannot write: Read-only file system"
    assert (etc / "hooks" / "qemu").read_text() == "#!/bin/sh\n"
    assert not (etc / "hooks" / "qemu.d" / "blkcache").exists()
