"""blkcache status --prometheus / --textfile, read by real Prometheus parsers.

The output is parsed with prometheus_client's parser and by a real
node_exporter (Debian's prometheus-node-exporter, textfile collector only),
started by the test on a free port and scraped over HTTP.  Values are
bounded by the kernel oracle (tests/kernel.py) read before and after.
"""

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import kernel
from cliproc import env, one_error_line, run
from needs import missing, need_tool
from units import PAGE, MiB
from unprivileged import node_mode

METRICS = {"blkcache_page_cache_bytes", "blkcache_device_size_bytes",
           "blkcache_page_cache_exact", "blkcache_writeback_failure_recorded",
           "blkcache_last_reading_timestamp_seconds"}
WEIRD = 'vol "a"\\b\nc'      # a quote, a backslash and a newline


@pytest.fixture(scope="module")
def parser():
    try:
        from prometheus_client import parser
    except ImportError:
        missing("prometheus_client is not installed (pip install '.[test]')")
    return parser


def samples(parser, text):
    """{(metric name, device, state or None): value} of blkcache's series (each
    a gauge) and node_textfile_scrape_error."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        if family.name.startswith("blkcache_"):
            assert family.type == "gauge", family
        elif family.name != "node_textfile_scrape_error":
            continue
        for sample in family.samples:
            key = (sample.name, sample.labels.get("device"), sample.labels.get("state"))
            assert key not in out, f"two series for {key}"
            out[key] = sample.value
    return out


def cache(dev, mib):
    """Cache the first mib MiB of dev (no readahead); the oracle's count."""
    os.posix_fadvise(dev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    return kernel.fill(dev.fd, 0, mib * MiB)


def test_values_against_the_kernel(parser, loops):
    """Two devices, one with dirty pages: each quantity one gauge series per
    device, in bytes, bounded by the kernel's readings around the run."""
    a, b = loops.attach(size=64 * MiB), loops.attach(size=32 * MiB)
    fa, fb = loops.hold(a), loops.hold(b, os.O_RDWR)
    os.posix_fadvise(fa, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(fa, 0, 8 * MiB)
    os.pwrite(fb, b"d" * (256 << 10), 0)        # 64 dirty pages on b
    try:
        before = {d: kernel.cachestat(fd) for d, fd in ((a, fa), (b, fb))}
        t0 = time.time()
        code, out, err = run("status", "--prometheus", a, b)
        t1 = time.time()
        after = {d: kernel.cachestat(fd) for d, fd in ((a, fa), (b, fb))}
        assert (code, err) == (0, "")
        got = samples(parser, out)
        assert {name for name, _, _ in got} == METRICS
        assert len(got) == 2 * (3 + 4)
        for dev, size in ((a, 64 * MiB), (b, 32 * MiB)):
            for state, field in (("cached", "nr_cache"), ("dirty", "nr_dirty")):
                value = got["blkcache_page_cache_bytes", dev, state]
                assert after[dev][field] * PAGE <= value <= before[dev][field] * PAGE, state
            assert got["blkcache_page_cache_bytes", dev, "writeback"] >= 0
            assert got["blkcache_device_size_bytes", dev, None] == size
            assert got["blkcache_page_cache_exact", dev, None] == 1
            assert got["blkcache_writeback_failure_recorded", dev, None] == 0
            assert t0 <= got["blkcache_last_reading_timestamp_seconds", dev, None] <= t1
        assert got["blkcache_page_cache_bytes", a, "cached"] >= 8 * MiB // 2
        # Dirty pages counted (between the readings: the flusher may write them back).
        assert before[b]["nr_dirty"] > 0
    finally:
        os.fsync(fb)


def test_failure_on_record(parser, loopdev):
    """blkcache_writeback_failure_recorded is 1 while a failed write-back of
    the device is on record (as drop records it), 0 once it is cleared."""
    from blkcache import failures

    record = failures.record(loopdev.fd, loopdev, errno.EIO, 4)
    code, out, err = run("status", "--prometheus", loopdev)
    assert (code, err) == (0, "")
    assert samples(parser, out)["blkcache_writeback_failure_recorded", loopdev, None] == 1
    os.unlink(record)
    code, out, err = run("status", "--prometheus", loopdev)
    assert samples(parser, out)["blkcache_writeback_failure_recorded", loopdev, None] == 0


def test_label_values_escaped(parser, loopdev, tmp_path):
    """A device path with a quote, a backslash and a newline (a symlink to a
    loop device) comes back intact through the parser, on one line."""
    link = tmp_path / WEIRD
    link.symlink_to(loopdev)
    cache(loopdev, 4)
    code, out, err = run("status", "--prometheus", str(link))
    assert (code, err) == (0, "")
    escaped = str(link).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    assert f'blkcache_page_cache_exact{{device="{escaped}"}} 1.0\n' in out
    got = samples(parser, out)
    assert {device for _, device, _ in got} == {str(link)}
    assert got["blkcache_page_cache_bytes", str(link), "cached"] > 0


def test_textfile_replaced_atomically(parser, loopdev, tmp_path):
    """--textfile renames a complete file over PATH (a reader of the old file
    keeps it whole), leaves no temporary file, and writes nothing on bad input."""
    cache(loopdev, 4)
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = directory / "blkcache.prom"
    path.write_text("# old\n")
    with open(path, encoding="utf-8") as old:
        inode = os.stat(path).st_ino
        code, out, err = run("status", "--textfile", str(path), loopdev)
        assert (code, out, err) == (0, "", "")
        assert old.read() == "# old\n"
    assert os.stat(path).st_ino != inode
    assert os.listdir(directory) == ["blkcache.prom"]
    got = samples(parser, path.read_text())
    assert got["blkcache_page_cache_bytes", loopdev, "cached"] > 0

    inode = os.stat(path).st_ino
    code, out, err = run("status", "--textfile", str(path), loopdev, "/nonexistent/dev")
    assert (code, out) == (2, "")
    assert one_error_line(err) == "blkcache: /nonexistent/dev: No such file or directory"
    assert os.stat(path).st_ino == inode and os.listdir(directory) == ["blkcache.prom"]

    missing_dir = tmp_path / "nonexistent" / "blkcache.prom"
    code, out, err = run("status", "--textfile", str(missing_dir), loopdev)
    assert (code, out) == (5, "")
    assert one_error_line(err) == f"blkcache: {missing_dir}: No such file or directory"

    code, out, err = run("status", "--textfile", str(directory / "blkcache.txt"), loopdev)
    assert (code, out) == (2, "") and ".prom" in one_error_line(err)
    code, out, err = run("status", "--prometheus", "--json", loopdev)
    assert (code, out) == (2, "") and "--json" in one_error_line(err)
    assert os.listdir(directory) == ["blkcache.prom"]


def test_without_prometheus_client_says_how_to_get_it(loopdev):
    """Without the extra: exit 5 and one line naming the pip command."""
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from blkcache.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "status", "--prometheus", loopdev],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 5 and proc.stdout == ""
    assert one_error_line(proc.stderr) == (
        "blkcache: Prometheus output needs the Python package prometheus_client "
        "(fix: pip install 'blkcache[prometheus]')")


def test_unknown_is_exact_zero_without_counts(parser, loopdev, nobody):
    """A user the kernel will not tell: exact 0, no page-cache series (never
    a false 0), exit 3 as for status."""
    import prometheus_client

    target = os.path.join(nobody.root, "prometheus_client")
    if not os.path.exists(target):
        shutil.copytree(os.path.dirname(prometheus_client.__file__), target,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, _, filenames in os.walk(target):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
    cache(loopdev, 4)
    with node_mode(loopdev, 0o644):
        proc = nobody.blkcache("status", "--prometheus", loopdev)
    assert proc.returncode == 3, proc.stderr
    got = samples(parser, proc.stdout)
    assert got["blkcache_page_cache_exact", loopdev, None] == 0
    assert got["blkcache_device_size_bytes", loopdev, None] == 64 * MiB
    assert not [key for key in got if key[0] == "blkcache_page_cache_bytes"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8")
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_node_exporter_serves_the_textfile(parser, loopdev, tmp_path):
    """A real node_exporter (textfile collector only) reads the file and
    serves every series, the escaped device path included, over HTTP."""
    exporter = need_tool("prometheus-node-exporter", "prometheus-node-exporter")
    link = tmp_path / WEIRD
    link.symlink_to(loopdev)
    directory = tmp_path / "textfile"
    directory.mkdir()
    cache(loopdev, 8)
    high = kernel.cached_pages(loopdev)
    code, out, err = run("status", "--textfile", str(directory / "blkcache.prom"),
                         loopdev, str(link))
    assert (code, out, err) == (0, "", "")
    port = free_port()
    with open(tmp_path / "exporter.log", "wb") as log:
        proc = subprocess.Popen([exporter, "--collector.disable-defaults",
                                 "--collector.textfile",
                                 f"--collector.textfile.directory={directory}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        text = scrape(f"http://127.0.0.1:{port}/metrics", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    low = kernel.cached_pages(loopdev)
    got = samples(parser, text)
    assert got["node_textfile_scrape_error", None, None] == 0, text
    for device in (loopdev, str(link)):
        assert {name for name, dev, _ in got if dev == device} == METRICS
        assert low * PAGE <= got["blkcache_page_cache_bytes", device, "cached"] <= high * PAGE
        assert got["blkcache_device_size_bytes", device, None] == 64 * MiB
        assert got["blkcache_page_cache_exact", device, None] == 1
