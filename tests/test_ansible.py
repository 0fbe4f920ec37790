"""The Ansible collection blkcache.blkcache, run by the real ansible-core.

The collection in ansible/ is built with ansible-galaxy, installed into a
temporary collections path, and its modules run on loop devices: ad hoc
(`ansible localhost -c local -m ...`) and from a playbook over several local
"hosts", each with its own loop device, in check mode and for real.
Every ANSIBLE_* directory (home, temporary files, collections) lives in a
temporary directory; nothing is written to ~/.ansible.

Page counts are bounded by the kernel oracle (tests/kernel.py) read before
and after each run: the page cache is reclaimed at any moment here.
"""

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import threading

import pytest

import blkcache
from blkcache import constants, failures

import kernel
from conftest import Device
from needs import missing
from units import PAGE, MiB
from unprivileged import node_mode

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTION = os.path.join(SOURCE, "ansible")
BIN = os.path.dirname(sys.executable)
RESULT = re.compile(r"^(\S+) \| (SUCCESS|CHANGED|FAILED!) => ", re.M)


class Ansible:
    """ansible-core's commands with every ANSIBLE_* path in ``root``."""

    def __init__(self, root):
        self.root = str(root)
        cfg = os.path.join(self.root, "ansible.cfg")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write("[defaults]\nforks = 5\nnocolor = true\nretry_files_enabled = false\n")
        self.env = dict(os.environ, ANSIBLE_CONFIG=cfg, HOME=self.root,
                        ANSIBLE_HOME=os.path.join(self.root, "home"),
                        ANSIBLE_LOCAL_TEMP=os.path.join(self.root, "tmp"),
                        ANSIBLE_REMOTE_TEMP=os.path.join(self.root, "remote-tmp"),
                        ANSIBLE_COLLECTIONS_PATH=os.path.join(self.root, "collections"),
                        BLKCACHE_STATE_DIR=os.path.join(self.root, "state"),
                        LC_ALL="C.UTF-8")

    def run(self, tool, *args, timeout=300):
        proc = subprocess.run([os.path.join(BIN, tool), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        return proc

    def adhoc(self, module, args, *extra, python=sys.executable):
        """(status, result dict) of one ad hoc run on localhost."""
        proc = self.run("ansible", "localhost", "-i", "localhost,", "-c", "local",
                        "-m", f"blkcache.blkcache.{module}", "-a", args,
                        "-e", f"ansible_python_interpreter={python}", *extra)
        match = RESULT.search(proc.stdout)
        assert match, f"no result in ansible's output:\n{proc.stdout}\n{proc.stderr}"
        result, _ = json.JSONDecoder().raw_decode(proc.stdout, match.end())
        assert proc.returncode == (2 if match.group(2) == "FAILED!" else 0), proc.stderr
        return match.group(2), result


@pytest.fixture(scope="module")
def ansible(tmp_path_factory):
    """The collection built and installed into a temporary collections path."""
    if not os.path.exists(os.path.join(BIN, "ansible")):
        missing("ansible-core is not installed beside this Python (pip install '.[test]')")
    tool = Ansible(tmp_path_factory.mktemp("ansible"))
    built = tool.run("ansible-galaxy", "collection", "build", COLLECTION,
                     "--output-path", tool.root)
    assert built.returncode == 0, built.stderr
    tool.tarball = os.path.join(tool.root, f"blkcache-blkcache-{blkcache.__version__}.tar.gz")
    assert os.path.exists(tool.tarball), f"{built.stdout}: not blkcache's version"
    installed = tool.run("ansible-galaxy", "collection", "install", tool.tarball,
                         "-p", tool.env["ANSIBLE_COLLECTIONS_PATH"])
    assert installed.returncode == 0, installed.stderr
    return tool


def cache(loopdev, mib=8):
    """Cache the first mib MiB of loopdev (no readahead); the oracle's count."""
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    return kernel.fill(loopdev.fd, 0, mib * MiB)


@contextlib.contextmanager
def kept_dirty(loopdev, data):
    """Rewrite data at offset 0 through the page cache every 50 ms, unsynced,
    while the block runs: the device has dirty pages whenever a module looks.

    Written once, they may be gone in a few seconds: the kernel's flusher
    writes back a block device's pages at once when its inode has been dirty
    for 30 s, and a loop device's inode outlives each attachment."""
    fd = os.open(loopdev, os.O_RDWR | os.O_CLOEXEC)
    stop = threading.Event()

    def rewrite():
        while not stop.wait(0.05):
            os.pwrite(fd, data, 0)

    os.pwrite(fd, data, 0)
    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        assert kernel.dirty_pages(loopdev) > 0
        yield
    finally:
        stop.set()
        writer.join()
        os.close(fd)


def test_collection_docs_render_without_warning(ansible):
    """ansible-doc renders both modules with no warning; the documented
    options are the ones the API takes, with its defaults."""
    for module, options in (("page_cache", {"device", "state", "expect_clean", "method",
                                            "offset", "length", "retries"}),
                            ("page_cache_info", {"device", "offset", "length"})):
        text = ansible.run("ansible-doc", f"blkcache.blkcache.{module}")
        assert text.returncode == 0, text.stderr
        assert "WARNING" not in text.stderr and "ERROR" not in text.stderr, text.stderr
        for section in ("OPTIONS", "EXAMPLES", "RETURN VALUES"):
            assert section in text.stdout
        doc = ansible.run("ansible-doc", "--json", f"blkcache.blkcache.{module}")
        assert doc.returncode == 0 and not doc.stderr.strip(), doc.stderr
        data = json.loads(doc.stdout)[f"blkcache.blkcache.{module}"]
        assert set(data["doc"]["options"]) == options
        assert {"rc", "msg", "devices"} <= set(data["return"])
        assert data["examples"].strip()
    options = json.loads(ansible.run("ansible-doc", "--json", "blkcache.blkcache.page_cache")
                         .stdout)["blkcache.blkcache.page_cache"]["doc"]["options"]
    assert options["retries"]["default"] == constants.DEFAULT_RETRIES
    assert options["method"]["choices"] == list(constants.METHODS)


def test_adhoc_check_mode_drop_and_idempotence(ansible, loopdev):
    """Check mode drops nothing and says changed; a real run drops every page;
    a second run changes nothing."""
    high = cache(loopdev)
    status, result = ansible.adhoc("page_cache", f"device={loopdev} state=dropped", "--check")
    low = kernel.cached_pages(loopdev)
    assert status == "CHANGED" and result["changed"] is True and result["rc"] == 0
    (dev,) = result["devices"]
    assert dev["device"] == loopdev and dev["changed"] is True
    assert dev["method"] == "ioctl" and dev["attempts"] == 0 and dev["after"] is None
    kernel.between(high, dev["before"]["cached"], low)
    kernel.not_dropped(loopdev.fd, high, what="check mode dropped pages")

    status, result = ansible.adhoc("page_cache", f"device={loopdev} state=dropped")
    (dev,) = result["devices"]
    assert status == "CHANGED" and dev["changed"] is True and result["rc"] == 0
    kernel.reported_before_drop(low, dev["before"]["cached"])
    assert dev["after"]["cached"] == 0 and dev["after"]["exact"] is True
    assert dev["attempts"] >= 1 and dev["method"] == "ioctl"
    assert kernel.cached_pages(loopdev) == 0

    status, result = ansible.adhoc("page_cache", f"device={loopdev} state=dropped")
    (dev,) = result["devices"]
    assert status == "SUCCESS" and result["changed"] is False and dev["changed"] is False
    assert dev["before"]["cached"] == 0 and dev["attempts"] == 0


def test_adhoc_failures_change_nothing(ansible, loops, tmp_path, monkeypatch):
    """A bad device among good ones fails (rc 2), dirty pages on one device
    under expect_clean (rc 4) and a failed write-back on record (rc 5) too,
    before any device is dropped; a host without blkcache gets one clear
    message."""
    held = [loops.attach(size=64 * MiB) for _ in range(2)]
    first, second = (Device(path, loops.hold(path)) for path in held)
    high = cache(first)
    cache(second)
    status, result = ansible.adhoc("page_cache", f"device={first},/nonexistent/dev")
    assert status == "FAILED!"
    assert result["rc"] == 2 and result["changed"] is False
    assert result["msg"] == "/nonexistent/dev: No such file or directory"
    kernel.not_dropped(first.fd, high, what="a device was dropped")

    data = b"x" * (16 << 10)
    high = kernel.count(first.fd)
    with kept_dirty(second, data):
        status, result = ansible.adhoc("page_cache",
                                       f"device={first},{second} expect_clean=true")
    assert status == "FAILED!" and result["rc"] == 4 and result["changed"] is False
    assert re.fullmatch(rf"{second}: \d+ dirty and \d+ writeback pages on a device expected "
                        r"clean; nothing was flushed or dropped; no device was dropped",
                        result["msg"]), result["msg"]
    kernel.not_dropped(first.fd, high, what="the clean device was dropped")
    assert kernel.read_buffered(second.fd, 0, len(data)) == data
    os.fsync(second.fd)

    # A failed write-back on record for the second device (as drop records it).
    monkeypatch.setenv("BLKCACHE_STATE_DIR", ansible.env["BLKCACHE_STATE_DIR"])
    record = failures.record(second.fd, second, errno.EIO, 4)
    high = {dev: kernel.count(dev.fd) for dev in (first, second)}
    status, result = ansible.adhoc("page_cache", f"device={first},{second}")
    assert status == "FAILED!" and result["rc"] == 5 and result["changed"] is False
    assert result["msg"].startswith(f"{second}: an earlier write-back of this device failed")
    assert record in result["msg"] and result["msg"].endswith("no device was dropped")
    for dev, before in high.items():
        kernel.not_dropped(dev.fd, before, what=f"{dev} was dropped")
    os.unlink(record)

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    status, result = ansible.adhoc("page_cache_info", f"device={first}",
                                   python=str(bare / "bin" / "python"))
    assert status == "FAILED!" and "rc" not in result
    assert result["msg"].startswith("Failed to import the required Python library (blkcache)")


RUN_AS_NOBODY = r"""
import json, sys
from blkcache.integrations import ansible
out = {}
for name in sys.argv[2:]:
    kwargs = {"info": {}, "verified": {"state": "verified"},
              "expect_clean": {"expect_clean": True, "method": "fadvise"},
              "dropped": {"method": "fadvise"}}[name]
    try:
        out[name] = (ansible.info if name == "info" else ansible.page_cache)(sys.argv[1], **kwargs)
    except ansible.Failure as failure:
        out[name] = dict(failure.to_dict(), failed=True)
print(json.dumps(out))
"""


def test_unknown_fails_and_info_says_inexact(loopdev, nobody):
    """What the modules run, as a user the kernel will not tell (a 0644 node):
    info reports exact false; verified, expect_clean and dropped fail with
    rc 3, and expect_clean drops nothing."""
    high = cache(loopdev)
    with node_mode(loopdev, 0o644):
        proc = nobody.py(RUN_AS_NOBODY, loopdev, "info", "verified", "expect_clean")
        assert proc.returncode == 0, proc.stderr
        first = json.loads(proc.stdout)
        kernel.not_dropped(loopdev.fd, high, what="expect_clean dropped pages")
        proc = nobody.py(RUN_AS_NOBODY, loopdev, "dropped")
        assert proc.returncode == 0, proc.stderr
        dropped = json.loads(proc.stdout)["dropped"]
    (state,) = first["info"]["devices"]
    assert first["info"]["changed"] is False and "failed" not in first["info"]
    assert state["exact"] is False and state["cached"] is None and state["reason"]
    for name in ("verified", "expect_clean"):
        assert first[name]["failed"] and first[name]["rc"] == 3
        assert first[name]["changed"] is False and first[name]["msg"].startswith(f"{loopdev}: ")
    assert "unknown" in first["verified"]["msg"]
    assert "nothing was flushed or dropped" in first["expect_clean"]["msg"]
    assert dropped["failed"] and dropped["rc"] == 3 and dropped["changed"] is True
    assert "cannot verify" in dropped["msg"]
    assert kernel.cached_pages(loopdev) == 0     # fadvise did drop, as nobody


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Read the page cache
      blkcache.blkcache.page_cache_info:
        device: "{{ dev }}"
      register: info

    - name: Drop it
      blkcache.blkcache.page_cache:
        device: "{{ dev }}"
        state: dropped
        expect_clean: "{{ expect_clean | default(false) }}"
      register: dropped
      ignore_errors: true

    - name: Verify it
      blkcache.blkcache.page_cache:
        device: "{{ dev }}"
        state: verified
      register: verified
      ignore_errors: true

    - name: Keep the results for the test
      ansible.builtin.copy:
        content: "{{ {'info': info, 'dropped': dropped, 'verified': verified} | to_json }}"
        dest: "{{ outdir }}/{{ inventory_hostname }}.json"
        mode: "0600"
      check_mode: false
"""


def test_playbook_over_several_hosts(ansible, loops, tmp_path):
    """Five local hosts, forks 5: three with cached pages, one clean, one with
    dirty pages under expect_clean; in check mode, then for real."""
    devices = {}
    for host in ("cached1", "cached2", "cached3", "clean", "dirty"):
        path = loops.attach(size=64 * MiB)
        devices[host] = Device(path, loops.hold(path))
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("".join(
        f"{host} ansible_connection=local ansible_python_interpreter={sys.executable} "
        f"dev={dev}" + (" expect_clean=true" if host == "dirty" else "") + "\n"
        for host, dev in devices.items()))
    for check, new in ((True, b"C" * (64 << 10)), (False, b"R" * (64 << 10))):
        out = tmp_path / ("check" if check else "real")
        out.mkdir()
        for host in ("cached1", "cached2", "cached3"):
            cache(devices[host], mib=4 if check else 8)
        with kept_dirty(devices["dirty"], new):
            high = {host: kernel.cached_pages(dev) for host, dev in devices.items()}
            proc = ansible.run("ansible-playbook", "-i", str(inventory), "--forks", "5",
                               str(tmp_path / "play.yml"), "-e", f"outdir={out}",
                               *(["--check"] if check else []))
            low = {host: kernel.cached_pages(dev) for host, dev in devices.items()}
        assert proc.returncode == 0, proc.stdout + proc.stderr
        res = {host: json.loads((out / f"{host}.json").read_text()) for host in devices}

        for host in ("cached1", "cached2", "cached3"):
            info, drop, ver = (res[host][k] for k in ("info", "dropped", "verified"))
            (state,) = info["devices"]
            assert info["changed"] is False and state["exact"] is True
            assert state["size"] == 64 * MiB and state["path"] == devices[host]
            (d,) = drop["devices"]
            assert drop["changed"] is True and d["changed"] is True
            assert 0 < d["before"]["cached"] <= state["cached"] <= high[host]
            if check:
                # Nothing dropped: readings bounded by the oracle's.
                assert low[host] <= d["before"]["cached"] and low[host] >= high[host] // 2
                assert d["after"] is None and d["attempts"] == 0
                assert ver["failed"] is True and ver["rc"] == 1 and ver["changed"] is False
                assert ver["msg"].startswith(f"{devices[host]}: ")
                assert 0 < ver["devices"][0]["status"]["cached"] <= d["before"]["cached"]
            else:
                assert d["after"]["cached"] == 0 and d["attempts"] >= 1 and low[host] == 0
                assert ver.get("failed") is not True and ver["devices"][0]["verdict"] == "clean"

        info, drop, ver = (res["clean"][k] for k in ("info", "dropped", "verified"))
        assert info["devices"][0]["cached"] == 0 and high["clean"] == 0
        assert drop["changed"] is False and drop["devices"][0]["before"]["cached"] == 0
        assert ver.get("failed") is not True and ver["devices"][0]["verdict"] == "clean"

        # Dirty pages under expect_clean: failed, rc 4, nothing dropped, data there.
        info, drop, ver = (res["dirty"][k] for k in ("info", "dropped", "verified"))
        assert drop["failed"] is True and drop["rc"] == 4 and drop["changed"] is False
        match = re.fullmatch(rf"{devices['dirty']}: (\d+) dirty and (\d+) writeback pages "
                             r"on a device expected clean; nothing was flushed or dropped",
                             drop["msg"])
        pages = len(new) // PAGE
        assert match and 0 < int(match.group(1)) + int(match.group(2)) <= pages, drop["msg"]
        assert low["dirty"] > 0
        assert kernel.read_buffered(devices["dirty"].fd, 0, len(new)) == new
        os.fsync(devices["dirty"].fd)

        recap = proc.stdout[proc.stdout.index("PLAY RECAP"):]
        # Both failures of the dirty host were ignored; its only change is the copy.
        assert re.search(r"dirty\s*: ok=4\s+changed=1\s+unreachable=0\s+failed=0\s+"
                         r"skipped=0\s+rescued=0\s+ignored=2", recap), recap
