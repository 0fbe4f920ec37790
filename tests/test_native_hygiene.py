"""Native code hygiene: sanitizers, gcc -fanalyzer, and an argv fuzz of the helper.

Everything is built in a temporary directory, never in the source tree:
- blkcache._native itself with -fsanitize=address,undefined, in a copy of the
  package, under which test_api, test_large and test_faults run again;
- tests/native/driver.c with csrc/blkcache.c, -fsanitize=address,undefined,
  run on a held loop device and on a regular file (every shim, edge arguments);
- gcc -fanalyzer over csrc/*.c must print nothing;
- csrc/blkcache-flush.c (the setcap helper), when this branch has it, built
  with the same sanitizers and fed random, huge and edge-case argv: it may
  only exit 0, 1 or 2, with at most one `blkcache-flush: ` line, never a
  signal or a sanitizer report.
"""

import glob
import os
import random
import shutil
import subprocess

import pytest

import kernel
import needs
from units import MiB

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")
SANITIZE = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "-Wall", "-Wextra"]
SAN_ENV = {"ASAN_OPTIONS": "abort_on_error=0:exitcode=99:detect_leaks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=99"}
FUZZ_RUNS = int(os.environ.get("BLKCACHE_FUZZ_RUNS", "300"))


def need_sources():
    if not os.path.exists(os.path.join(CSRC, "blkcache.c")):
        pytest.skip("csrc/ not here (tests run from an installed package without sources)")


def compile_c(out, sources, extra=(), libs=()):
    needs.need_tool("gcc", "gcc")
    cmd = ["gcc", *SANITIZE, *extra, "-I", CSRC, "-o", out, *sources, "-lpthread", *libs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "asan" in proc.stderr.lower() and "cannot find" in proc.stderr:
        needs.missing("libasan/libubsan not installed (apt-get install libasan8 libubsan1)")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    need_sources()
    out = tmp_path_factory.mktemp("native") / "driver"
    return compile_c(str(out), [os.path.join(HERE, "native", "driver.c"),
                                os.path.join(CSRC, "blkcache.c")])


def run_sanitized(argv, **kwargs):
    env = dict(os.environ, **SAN_ENV)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                          **kwargs)


def assert_clean(proc):
    text = proc.stdout + proc.stderr
    assert "Sanitizer" not in text and "runtime error" not in text, text
    assert proc.returncode == 0, text
    assert proc.stdout.startswith("ok "), text


def test_shims_under_asan_ubsan_on_a_loop_device(driver, loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.fill(loopdev.fd, 8 * MiB, MiB)
    proc = run_sanitized([driver, loopdev, str(8 * MiB), str(MiB)])
    assert_clean(proc)
    assert kernel.cachestat(loopdev.fd)["nr_cache"] == 0      # the driver dropped it


def test_shims_under_asan_ubsan_on_a_regular_file(driver, scratch_dir):
    path = os.path.join(scratch_dir, "image")
    with open(path, "wb") as f:
        f.write(os.urandom(16 * MiB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        kernel.fill(fd, 4 * MiB, MiB)
        assert_clean(run_sanitized([driver, path, str(4 * MiB), str(MiB)]))
    finally:
        os.close(fd)


def test_gcc_analyzer_is_silent():
    need_sources()
    needs.need_tool("gcc", "gcc")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.c")))
    assert sources
    for source in sources:
        proc = subprocess.run(["gcc", "-fanalyzer", "-Wall", "-Wextra", "-O2",
                               "-D_FORTIFY_SOURCE=2", "-I", CSRC, "-c", "-o", os.devnull,
                               source], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout + proc.stderr == "", \
            f"{source}:\n{proc.stdout}{proc.stderr}"


# -- the setcap helper ----------------------------------------------------------

HELPER_SOURCE = os.path.join(CSRC, "blkcache-flush.c")


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    need_sources()
    if not os.path.exists(HELPER_SOURCE):
        pytest.skip("helper not built on this branch (no csrc/blkcache-flush.c)")
    out = str(tmp_path_factory.mktemp("helper") / "blkcache-flush")
    flags = ["-fPIE", "-pie", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]
    try:
        return compile_c(out, [HELPER_SOURCE], flags)
    except AssertionError:
        return compile_c(out, [HELPER_SOURCE], flags, ["-lcap"])


def edge_arguments():
    numbers = ["-1", "0", "1", "2", "3", "4", "255", "1023", "1024", "65535", "2147483647",
               "2147483648", "-2147483648", "-2147483649", "4294967295", "4294967296",
               "9223372036854775807", "9223372036854775808", "18446744073709551615",
               "18446744073709551616", "9" * 100, "9" * 10000, "", " 3", "3 ", "+3", "03",
               "0x3", "3x", "x", "3.0", "1e3", "\u0663", "--3", "3\n", "\t3"]
    return [["fd:" + n] for n in numbers] + [["FD:3"], ["fd"], ["fd::3"], ["fd:3:4"]]


def check_helper_run(proc, argv):
    text = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1, 2), (argv[:3], proc.returncode, text[-2000:])
    assert "Sanitizer" not in text and "runtime error" not in text, text[-4000:]
    lines = proc.stderr.splitlines()
    assert len(lines) <= 1, (argv[:3], lines[:5])
    if lines:
        assert lines[0].startswith("blkcache-flush: "), lines[0][:200]
    if proc.returncode != 0:
        assert len(lines) == 1, (argv[:3], proc.returncode)


def test_helper_argv_fuzz(helper, loopdev, tmp_path):
    """Random bytes, huge argv and fd: edge numbers: no crash, 0/1/2 only."""
    env = dict(SAN_ENV, ASAN_OPTIONS="exitcode=99:detect_leaks=0", PATH="/usr/bin:/bin")
    cwd = tmp_path / "empty"      # random relative paths resolve to nothing here
    cwd.mkdir()
    rng = random.Random(int(os.environ.get("BLKCACHE_FUZZ_SEED", "5")))
    cases = [[], [""], ["", ""], [loopdev, loopdev], ["-h"], ["--help"], ["--"],
             ["/dev/null"], [str(tmp_path)], ["x" * 5000], ["/" * 5000],
             ["a"] * 20000, ["fd:3"] * 3, *edge_arguments()]
    for _ in range(FUZZ_RUNS):
        n = rng.choice((1, 1, 1, 2, 3, rng.randrange(0, 64)))
        argv = []
        for _ in range(n):
            raw = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(0, 300)))
            if rng.random() < 0.3:
                raw = b"fd:" + raw[:rng.randrange(0, 25)]
            argv.append(raw)
        cases.append(argv)
    crashes = 0
    for argv in cases:
        proc = subprocess.run([helper, *argv], capture_output=True, env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, timeout=30)
        proc.stdout = proc.stdout.decode("utf-8", "replace")
        proc.stderr = proc.stderr.decode("utf-8", "replace")
        crashes += proc.returncode < 0
        check_helper_run(proc, argv)
        if not argv or len(argv) > 1:
            assert proc.returncode == 2, (argv[:3], proc.stderr)
    assert crashes == 0
    # The real thing still works: a held device by path and by inherited fd.
    # (No readahead: pages still locked by readahead in flight would survive.)
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, MiB)
    proc = subprocess.run([helper, loopdev], capture_output=True, text=True, env=env)
    check_helper_run(proc, [loopdev])
    assert proc.returncode == 0 and kernel.cachestat(loopdev.fd)["nr_cache"] == 0
    kernel.read_buffered(loopdev.fd, 0, MiB)
    proc = subprocess.run([helper, f"fd:{loopdev.fd}"], capture_output=True, text=True,
                          env=env, pass_fds=(loopdev.fd,))
    check_helper_run(proc, ["fd"])
    assert proc.returncode == 0 and kernel.cachestat(loopdev.fd)["nr_cache"] == 0


# -- the Python tests on a sanitized cffi module -----------------------------------

SANITIZED_BUILD = r"""
import os, sys
from cffi import FFI
csrc, tmpdir = sys.argv[1], sys.argv[2]
ffi = FFI()
with open(os.path.join(csrc, "blkcache.h")) as f:
    ffi.cdef(f.read())
flags = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer"]
ffi.set_source("blkcache._native", '#include <stdint.h>\n#include "blkcache.h"\n',
               sources=[os.path.join(csrc, "blkcache.c")], include_dirs=[csrc],
               extra_compile_args=flags, extra_link_args=flags[2:4], libraries=["pthread"])
print(ffi.compile(tmpdir=tmpdir))
"""


@pytest.mark.loop    # runs loop-device tests in a child, as root
def test_python_tests_on_a_sanitized_native_module(tmp_path):
    """test_api, test_large and test_faults with blkcache._native built with
    ASan+UBSan (the runtimes preloaded into Python), in a copy of the package."""
    import sys

    import blkcache

    need_sources()
    needs.need_tool("gcc", "gcc")
    runtimes = [subprocess.run(["gcc", f"-print-file-name=lib{name}.so"], capture_output=True,
                               text=True).stdout.strip() for name in ("asan", "ubsan")]
    if not all(os.path.isabs(path) and os.path.exists(path) for path in runtimes):
        needs.missing("libasan/libubsan not installed (apt-get install libasan8 libubsan1)")
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(blkcache.__file__), pkg / "blkcache",
                    ignore=shutil.ignore_patterns("_native*.so", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", SANITIZED_BUILD, CSRC, str(tmp_path / "build")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(proc.stdout.strip().splitlines()[-1], pkg / "blkcache")
    env = dict(os.environ, LD_PRELOAD=" ".join(runtimes), PYTHONPATH=str(pkg),
               ASAN_OPTIONS="detect_leaks=0:exitcode=99",   # CPython itself "leaks"
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=99",
               BLKCACHE_REQUIRE_LOOP="1")
    where = subprocess.run([sys.executable, "-c", "import blkcache._native as n; "
                            "print(n.__file__)"], cwd=pkg, env=env, capture_output=True,
                           text=True)
    assert where.stdout.strip().startswith(str(pkg)), where
    tests = [os.path.join(HERE, name) for name in ("test_api.py", "test_large.py",
                                                   "test_faults.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=pkg, env=env, capture_output=True, text=True,
                          timeout=600)
    text = proc.stdout + proc.stderr
    assert "Sanitizer" not in text and "runtime error" not in text, text[-6000:]
    assert proc.returncode == 0, text[-6000:]
