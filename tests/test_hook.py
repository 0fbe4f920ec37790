"""The libvirt qemu hook: fed a domain XML and hook arguments, on real loop devices."""

import os
import re
import subprocess
import sys

import pytest

from blkcache import hooks

import cliproc
import kernel
from units import PAGE, MiB

DOMAIN = """<domain type='kvm'>
  <name>guest1</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source dev='{0}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='{2}'/>
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
  </devices>
</domain>
"""


def run_hook(args, xml, env_extra=None):
    env = dict(os.environ)
    env["BLKCACHE"] = f"{sys.executable} -m blkcache"
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, hooks.script_path("libvirt"), *args],
                          input=xml, capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def three_volumes(loops):
    """Destination views of three shared volumes, each cached and held open;
    the source's writes made the first one's cache stale."""
    devs, fds = [], []
    for _ in range(3):
        image = loops.image(16 * MiB)
        source, dest = loops.attach(image), loops.attach(image)
        fd = loops.hold(dest)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        kernel.fill(fd, 0, 64 * PAGE)
        devs.append((source, dest))
        fds.append(fd)
    src_fd = loops.hold(devs[0][0], os.O_RDWR)
    os.pwrite(src_fd, b"new!" * (PAGE // 4), 4 * PAGE)
    os.fsync(src_fd)
    return [d for _, d in devs], fds


@pytest.mark.parametrize("event", [("migrate", "begin", "-"), ("prepare", "begin", "-"),
                                   ("start", "begin", "-"), ("started", "begin", "-")])
def test_hook_drops_exactly_the_domains_block_devices(three_volumes, tmp_path, event):
    (d1, d2, d3), fds = three_volumes
    xml = DOMAIN.format(d1, d2, tmp_path / "image.qcow2")
    # (The stressor spares d1: its one stale page is what the hook must find.)
    before = [kernel.count(fd, stress=0 if i == 0 else None) for i, fd in enumerate(fds)]
    proc = run_hook(["guest1", *event], xml)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""          # "migrate begin": empty output = XML unchanged
    assert [kernel.cachestat(fd)["nr_cache"] for fd in fds[:2]] == [0, 0]
    kernel.not_dropped(fds[2], before[2], what="a volume of no domain disk was dropped")
    err = proc.stderr
    assert "/dev/blkcache-test-no-such-volume does not exist" in err
    assert f"running: blkcache verify --coherence --recursive {d1} {d2}" in err
    assert f"running: blkcache drop --expect-clean --recursive {d1} {d2}" in err
    compared = int(re.search(rf"{re.escape(d1)}: stale: 1 of (\d+) compared pages differ",
                             err).group(1))
    kernel.reported_before_drop(before[0], compared, d1)
    assert f"  stale offset {4 * PAGE} length {PAGE} (1 pages, 4K)" in err
    matched = int(re.search(rf"{re.escape(d2)}: coherent: (\d+) cached pages match",
                            err).group(1))
    kernel.reported_before_drop(before[1], matched, d2)
    assert d3 not in err


@pytest.mark.parametrize("event", [("stopped", "end", "-"), ("release", "end", "-"),
                                   ("migrate", "end", "-"), ("reconnect", "begin", "-")])
def test_other_events_touch_nothing(three_volumes, tmp_path, event):
    (d1, d2, _), fds = three_volumes
    before = [kernel.count(fd) for fd in fds]
    proc = run_hook(["guest1", *event], DOMAIN.format(d1, d2, tmp_path / "x"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    for fd, cached in zip(fds, before):
        kernel.not_dropped(fd, cached)


def test_dirty_pages_on_the_destination_abort(loops, tmp_path):
    dev = loops.attach(size=16 * MiB)
    wfd = loops.hold(dev, os.O_RDWR)
    os.pwrite(wfd, b"x" * PAGE, 0)
    proc = run_hook(["guest1", "migrate", "begin", "-"],
                    DOMAIN.format(dev, dev, tmp_path / "x"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "refusing migrate" in proc.stderr
    assert kernel.cachestat(wfd)["nr_dirty"] == 1      # nothing written, nothing dropped


def test_bad_xml_no_disks_and_missing_blkcache(loopdev, tmp_path):
    proc = run_hook(["guest1", "migrate", "begin", "-"], "<domain>")
    assert proc.returncode == 1 and "cannot parse the domain XML" in proc.stderr
    proc = run_hook(["guest1", "prepare", "begin", "-"],
                    "<domain><devices/></domain>")
    assert (proc.returncode, proc.stdout) == (0, "")
    kernel.fill(loopdev.fd, 0, 64 * PAGE)
    cached = kernel.count(loopdev.fd)
    proc = run_hook(["guest1", "start", "begin", "-"],
                    DOMAIN.format(loopdev, loopdev, tmp_path / "x"),
                    {"BLKCACHE": "", "PATH": str(tmp_path)})
    assert proc.returncode == 1
    assert "blkcache not found on PATH (set BLKCACHE); refusing" in proc.stderr
    kernel.not_dropped(loopdev.fd, cached)


def test_cli_prints_the_shipped_script():
    out = cliproc.completed("hook", "libvirt")
    assert out.returncode == 0
    with open(hooks.script_path("libvirt"), encoding="utf-8") as f:
        assert out.stdout == f.read()
    assert out.stdout.startswith("#!/usr/bin/env python3\n")
    path = cliproc.completed("hook", "libvirt", "--path")
    assert path.stdout.strip() == hooks.script_path("libvirt")
