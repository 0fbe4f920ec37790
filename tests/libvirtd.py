"""A private libvirt daemon for the tests: real libvirtd, virtlogd and QEMU.

Each Daemon runs in a mount and UTS namespace of its own (``unshare -m -u``,
propagation private) in which /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt are bind mounts of directories
under the daemon's root: nothing of the machine's libvirt is read or
written, and two daemons stand for two hypervisors (own hostname, own
host_uuid).  The blkcache hook is installed inside that namespace with the
real command, `blkcache hook libvirt --install`, before libvirtd starts
(libvirtd reads its hooks only at start).  Clients reach a daemon with
``virsh -c URI`` (qemu+unix:///system?socket=...).

The daemons are children of the test process (no -d), so stop() can end
them by pid and reap them; stop() destroys every running domain first and
kills any QEMU of this daemon left behind (pid file).
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import cliproc

BIND = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
        ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"))
HOOK = "/etc/libvirt/hooks/qemu.d/blkcache"
VIRSH_TIMEOUT = 180

# The hook's standard error is logged by libvirt's command runner at debug level:
# "1:util.command" keeps exactly those lines (and "Calling hook" from util.hook).
LIBVIRTD_CONF = """\
host_uuid = "{uuid}"
log_filters = "1:util.hook 1:util.command 1:qemu.qemu_capabilities 1:util.filecache"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
"""
# No cgroups: nothing left under /sys/fs/cgroup; QEMU runs as libvirt-qemu (TCG).
# libvirt's default device list without /dev/kvm, which the namespace hides.
QEMU_CONF = """\
cgroup_controllers = [ ]
cgroup_device_acl = [ "/dev/null", "/dev/full", "/dev/zero", "/dev/random",
                      "/dev/urandom", "/dev/ptmx", "/dev/rtc", "/dev/hpet" ]
"""

# The namespace: bind mounts, hostname, then wait (the daemons enter it by nsenter).
NAMESPACE_SCRIPT = """\
set -e
root=$1; host=$2
for pair in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt \\
            log:/var/log/libvirt cache:/var/cache/libvirt; do
    mount --bind "$root/${pair%%:*}" "${pair#*:}"
done
# KVM is root-only here, so libvirt's QEMU (libvirt-qemu) runs TCG; probing as root
# would see KVM, and libvirt would find its capability cache outdated on every call.
if [ -e /dev/kvm ]; then
    : > "$root/no-kvm"; chmod 600 "$root/no-kvm"
    mount --bind "$root/no-kvm" /dev/kvm
fi
hostname "$host"
touch "$root/ready"
exec sleep 100000
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _end(proc, timeout=20):
    """SIGTERM a child, SIGKILL it if it lingers, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Daemon:
    """libvirtd + virtlogd in a private namespace under ``root`` (a directory)."""

    def __init__(self, root, hostname):
        self.root = root
        self.hostname = hostname
        self.uuid = str(uuid.uuid4())
        self.uri = f"qemu+unix:///system?socket={root}/run/libvirt-sock"
        self.holder = self.virtlogd = self.libvirtd = None
        self.made = []
        self.install_output = None

    def path(self, inside):
        """The host path of a path inside the namespace (under one of BIND)."""
        for sub, mount in BIND:
            if inside == mount or inside.startswith(mount + "/"):
                return os.path.join(self.root, sub, inside[len(mount) + 1:])
        raise ValueError(inside)

    def _nsenter(self, *args, **kwargs):
        return subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-m", "-u", *args],
                                stdin=subprocess.DEVNULL, **kwargs)

    def start(self, capabilities_from=None):
        for sub, _ in BIND:
            os.makedirs(os.path.join(self.root, sub), mode=0o755, exist_ok=True)
        os.chmod(self.root, 0o755)
        with open(os.path.join(self.root, "etc", "libvirtd.conf"), "w") as f:
            f.write(LIBVIRTD_CONF.format(uuid=self.uuid))
        with open(os.path.join(self.root, "etc", "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        # Mount points the machine lacks (e.g. /run/libvirt before libvirt ever ran)
        # are made here and removed by stop().
        self.made = [mount for _, mount in BIND if not os.path.isdir(mount)]
        for mount in self.made:
            os.makedirs(mount, mode=0o755, exist_ok=True)
        if capabilities_from:
            _copy_tree(capabilities_from.path("/var/cache/libvirt/qemu"),
                       self.path("/var/cache/libvirt/qemu"))
        self.holder = subprocess.Popen(
            ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c",
             NAMESPACE_SCRIPT, "sh", self.root, self.hostname],
            stdin=subprocess.DEVNULL)
        _wait(lambda: os.path.exists(os.path.join(self.root, "ready"))
              or self.holder.poll() is not None, 30, "the namespace")
        if self.holder.poll() is not None:
            raise RuntimeError(f"namespace set-up failed ({self.holder.returncode})")
        # The real command, in the daemon's namespace: /etc/libvirt is ours there.
        proc = self._nsenter(sys.executable, "-m", "blkcache", "hook", "libvirt",
                             "--install", stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cliproc.env())
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"hook --install failed: {out}{err}")
        self.install_output = out
        log = open(os.path.join(self.root, "daemons.out"), "ab")
        with log:
            self.virtlogd = self._nsenter("virtlogd", "-p", "/run/libvirt/virtlogd.pid",
                                          stdout=log, stderr=log)
            _wait(lambda: self._alive(self.virtlogd) and
                  os.path.exists(self.path("/run/libvirt/virtlogd-sock")), 30, "virtlogd")
            self.libvirtd = self._nsenter("libvirtd", "-p", "/run/libvirt/libvirtd.pid",
                                          stdout=log, stderr=log)
        _wait(self._answers, 60, f"libvirtd in {self.root}")
        return self

    def _alive(self, proc):
        if proc.poll() is not None:
            with open(os.path.join(self.root, "daemons.out"), errors="replace") as f:
                raise RuntimeError(f"{proc.args[5:]} exited with {proc.returncode}: "
                                   + f.read()[-2000:])
        return True

    def _answers(self):
        return self._alive(self.libvirtd) and \
            self.virsh("uri", check=False, timeout=30).returncode == 0

    def virsh(self, *args, check=True, timeout=VIRSH_TIMEOUT):
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def define(self, xml, name):
        path = os.path.join(self.root, f"{name}.xml")
        with open(path, "w") as f:
            f.write(xml)
        self.virsh("define", path)
        return path

    def state(self, name):
        proc = self.virsh("domstate", name, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def log(self):
        """libvirtd's log: the hook calls, their results and standard error."""
        with open(self.path("/var/log/libvirt/libvirtd.log"), errors="replace") as f:
            return f.read()

    def hook_runs(self, guest):
        """[(event, seconds)] of the blkcache hook's runs for ``guest``, timed
        from libvirt's own log: 'Calling hook' to that thread's next result.
        (libvirt logs every hook's result as "status 0", failed or not: the
        hook's own lines tell.)"""
        calling = re.compile(r"^(\S+ \S+)\+0000: (\d+): debug : virRunScript:\d+ : "
                             r"Calling hook (\S+) id=(\S+) op=(\S+) subop=(\S+)")
        result = re.compile(r"^(\S+ \S+)\+0000: (\d+): debug : virCommandRun:\d+ : "
                            r"Result ")
        pending, runs = {}, []
        for line in self.log().splitlines():
            m = calling.match(line)
            if m:
                stamp, tid, hook, name, op, sub = m.groups()
                if hook == HOOK and name == guest:
                    pending[tid] = (stamp, f"{op} {sub}")
                continue
            m = result.match(line)
            if m and m.group(2) in pending:
                start, event = pending.pop(m.group(2))
                runs.append((event, _seconds(m.group(1)) - _seconds(start)))
        return runs

    def stop(self):
        """Destroy every running domain, end the daemons and the namespace."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            names = self.virsh("list", "--name", check=False, timeout=60).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False, timeout=60)
        self._kill_qemus()
        _end(self.libvirtd)
        _end(self.virtlogd)
        _end(self.holder)
        for mount in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(mount)

    def _kill_qemus(self):
        piddir = self.path("/run/libvirt/qemu")
        if not os.path.isdir(piddir):
            return
        for entry in os.listdir(piddir):
            if not entry.endswith(".pid"):
                continue
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(piddir, entry)) as f:
                    pid = int(f.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"qemu-system" in f.read():
                        os.kill(pid, signal.SIGKILL)


def _seconds(stamp):
    """Seconds of a libvirt log time stamp 'YYYY-MM-DD HH:MM:SS.mmm'."""
    day, clock = stamp.split()
    h, m, s = clock.split(":")
    return int(day.replace("-", "")) * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def _copy_tree(src, dst):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
        subprocess.run(["cp", "-a", src + "/.", dst], check=True)


def domain_xml(name, disks, memory_mib=64, uuid_=None, metadata=""):
    """A tiny TCG domain: no OS, no display, the given <disk> elements."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid_ or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os><type arch='x86_64'>hvm</type></os>
  <on_reboot>destroy</on_reboot>
  <devices>
{disks}
  </devices>
</domain>
"""


def block_disk(dev, target="vda"):
    return f"""    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source dev='{dev}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>"""
