#!/usr/bin/env python3
"""Benchmark blkcache against its peers on scratch loop devices.

Run as root, with the interpreter that runs blkcache (the package must be
importable: installed, or PYTHONPATH pointing at the source tree):

    python bench/bench.py                 # full run, a few minutes
    python bench/bench.py --quick         # smoke run, seconds (CI)
    python bench/bench.py --json out.json --runs 7 --check

Each scenario is prepared on loop devices over sparse files in /var/tmp,
held open by this process so their page cache stays.  The commands of a row
run alternately (blkcache first on even runs, the peer first on odd runs);
the table shows medians of wall time and peak RSS (os.wait4's ru_maxrss of
the child) and the ratios blkcache / peer, against the goals of issue 6.
Peers that are missing (vmtouch, fincore >= 2.40, the blkcache-flush helper,
gcc for the C timing program) are reported as skipped rows.  The bench
installs nothing.  Every loop device it attached is detached on exit, also
on Ctrl-C or SIGTERM.
"""

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_JSON = "/var/tmp/blkcache-bench.json"
#: Pause after filling a cache, before a measurement, so every side starts
#: from the same settled state.
SETTLE = 0.02
#: The in-process drops start this long after the refill, in both programs
#: (longer than the interpreter's start-up).
START_DELAY = 0.25

C_TIMING = r"""
/* The syscalls blkcache.status() / blkcache.drop() make, timed in C. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

struct cs_range { uint64_t off, len; };
struct cs { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cachestat(int fd, uint64_t len, struct cs *out)
{
    struct cs_range r = { 0, len };
    return syscall(451, fd, &r, out, 0);
}

/* usage: timing status|drop DEV [N [START]]: prints N lines "seconds cached_after".
 * START: a CLOCK_MONOTONIC time to wait for before the untimed warm-up call
 * (a status) that precedes the timed ones. */
int main(int argc, char **argv)
{
    int drop, n, i;
    double start = argc > 4 ? atof(argv[4]) : 0;

    if (argc < 3)
        return 2;
    drop = strcmp(argv[1], "drop") == 0;
    n = argc > 3 ? atoi(argv[3]) : 1;
    if (start > now()) {
        double wait = start - now();
        struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
        nanosleep(&ts, NULL);
    }
    for (i = -1; i < n; i++) {      /* i == -1: an untimed warm-up status */
        struct stat sb;
        struct cs before, after;
        uint64_t size = 0;
        double t0, t1;
        int fd;

        t0 = now();
        fd = open(argv[2], O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);

        if (fd < 0 || fstat(fd, &sb) != 0 || !S_ISBLK(sb.st_mode) ||
            ioctl(fd, BLKGETSIZE64, &size) != 0 || cachestat(fd, size, &before) != 0) {
            perror(argv[2]);
            return 1;
        }
        after = before;
        if (drop && i >= 0 && (fdatasync(fd) != 0 || ioctl(fd, BLKFLSBUF, 0) != 0 ||
                     cachestat(fd, size, &after) != 0)) {
            perror(argv[2]);
            return 1;
        }
        close(fd);
        t1 = now();
        if (i >= 0)
            printf("%.9f %llu\n", t1 - t0, (unsigned long long)after.nr_cache);
    }
    return 0;
}
"""


C_LAUNCH = r"""
/* launch ARGV...: run ARGV with stdout on /dev/null; print "wall maxrss status".
 * A separate small process, because a child's ru_maxrss includes the memory
 * of the process that forked it (the old mm's high-water mark is kept at
 * exec), so children of the bench itself would all show its RSS. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    struct rusage ru;
    int status, null;
    pid_t pid;

    if (argc < 2)
        return 127;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid = fork();
    if (pid == 0) {
        null = open("/dev/null", O_WRONLY);
        if (null >= 0)
            dup2(null, 1);
        execv(argv[1], argv + 1);
        _exit(127);
    }
    if (pid < 0 || wait4(pid, &status, 0, &ru) != pid)
        return 127;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.9f %ld %d\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
           ru.ru_maxrss, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}
"""


PY_TIMING = r"""
# The Python twin of C_TIMING: blkcache.status() / blkcache.drop() timed in a
# fresh process, after the import, the wait for START and an untimed warm-up
# call (a status), like the C.
import sys
import time

import blkcache

mode, dev, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
call = blkcache.drop if mode == "drop" else blkcache.status
if start > time.monotonic():
    time.sleep(start - time.monotonic())
blkcache.status(dev)
for _ in range(n):
    t0 = time.perf_counter()
    result = call(dev)
    t1 = time.perf_counter()
    left = result.after.cached if mode == "drop" else result.cached
    print(f"{t1 - t0:.9f} {left}")
"""


class BenchError(Exception):
    pass


# -- kernel helpers (independent of blkcache) ---------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _CsRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cached_pages(fd, length):
    """Pages of fd cached in [0, length) by raw cachestat(2); None if unavailable."""
    rng, out = _CsRange(0, length), _Cs()
    if _libc.syscall(ctypes.c_long(451), ctypes.c_int(fd), ctypes.byref(rng),
                     ctypes.byref(out), ctypes.c_uint(0)) != 0:
        return None
    return out.nr_cache


def tool_version(argv):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout + proc.stderr).strip()
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else None


# -- the scratch world ---------------------------------------------------------

class World:
    """Loop devices over sparse files, held open; all undone by close()."""

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="blkcache-bench-", dir="/var/tmp")
        self.devices = []
        self.fds = []

    def attach(self, size, name):
        path = os.path.join(self.workdir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        # direct I/O to the backing file: the loop device's own page cache is
        # the only copy, as on a real host.  Falls back to buffered I/O.
        # Ctrl-C or SIGTERM between losetup attaching and our noting the
        # device would leak it: hold those signals until it is noted.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for extra in (["--direct-io=on"], []):
                proc = subprocess.run(["losetup", "--find", "--show", *extra, path],
                                      capture_output=True, text=True, timeout=60)
                if proc.returncode == 0:
                    break
            else:
                raise BenchError(f"losetup {path}: {proc.stderr.strip()}")
            device = proc.stdout.strip()
            self.devices.append(device)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return device, fd

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        problems = []
        for device in reversed(self.devices):
            for _ in range(50):
                proc = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
                if proc.returncode == 0 or "No such device" in proc.stderr:
                    break
                time.sleep(0.1)
            else:
                problems.append(f"{device}: {proc.stderr.strip()}")
        self.devices.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if problems:
            raise BenchError("could not detach " + "; ".join(problems))


def fill(fd, length, tries=5):
    """Read [0, length) through fd so that its pages are cached.

    Proactive reclaim may take a page between the read and the check: then
    read again (a page that never stays cached is an error).
    """
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    for _ in range(tries):
        off = 0
        while off < length:
            n = os.preadv(fd, [view[:min(len(buf), length - off)]], off)
            if n <= 0:
                break
            off += n
        got = cached_pages(fd, length)
        if got is None or got >= length // PAGE:
            return
    raise BenchError(f"fill: only {got} of {length // PAGE} pages cached")


# -- running commands -----------------------------------------------------------

class Runner:
    """Runs a command with stdout on /dev/null: (wall seconds, peak RSS KiB).

    Through the small C launcher when there is one (see C_LAUNCH); else with
    posix_spawn, and the RSS is not measured (it would be this process's).
    """

    def __init__(self, workdir, env, launcher=None):
        self.env = env
        self.launcher = launcher
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.errpath = os.path.join(workdir, "stderr")

    def run(self, argv, expect=(0,)):
        errfd = os.open(self.errpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        try:
            if self.launcher:
                proc = subprocess.run([self.launcher, *argv], stdout=subprocess.PIPE,
                                      stderr=errfd, env=self.env, text=True, timeout=600)
                try:
                    wall, rss, code = proc.stdout.split()
                    wall, rss, code = float(wall), int(rss), int(code)
                except ValueError:
                    raise BenchError(f"launch {argv[0]}: {proc.stdout!r}") from None
            else:
                t0 = time.perf_counter()
                pid = os.posix_spawn(argv[0], argv, self.env,
                                     file_actions=[(os.POSIX_SPAWN_DUP2, self.devnull, 1),
                                                   (os.POSIX_SPAWN_DUP2, errfd, 2)])
                _, status, _usage = os.wait4(pid, 0)
                wall = time.perf_counter() - t0
                rss, code = None, os.waitstatus_to_exitcode(status)
        finally:
            os.close(errfd)
        if code not in expect:
            with open(self.errpath, errors="replace") as f:
                err = f.read().strip()
            raise BenchError(f"{' '.join(argv)}: exit {code} (expected {expect}): {err}")
        return wall, rss

    def close(self):
        os.close(self.devnull)


class Side:
    """One contender of a row: a label and a function giving (wall, rss)."""

    def __init__(self, label, measure, cmd=None):
        self.label, self.measure, self.cmd = label, measure, cmd
        self.walls, self.rss = [], []

    def sample(self):
        wall, rss = self.measure()
        self.walls.append(wall)
        if rss is not None:
            self.rss.append(rss)

    def summary(self):
        return {"label": self.label, "cmd": self.cmd, "walls": self.walls,
                "wall_median": statistics.median(self.walls) if self.walls else None,
                "rss_kib": self.rss,
                "rss_median_kib": statistics.median(self.rss) if self.rss else None}


class Row:
    def __init__(self, name, what, blk=None, peer=None, wall_goal=None, rss_goal=None,
                 rss_limit_kib=None, skip=None, unit="ms"):
        self.name, self.what = name, what
        self.blk, self.peer = blk, peer
        self.wall_goal, self.rss_goal, self.rss_limit_kib = wall_goal, rss_goal, rss_limit_kib
        self.skip, self.unit = skip, unit
        self.derived = None     # (wall_ratio) for rows computed from others

    def result(self):
        out = {"name": self.name, "what": self.what, "skipped": self.skip,
               "goals": {"wall_ratio_max": self.wall_goal, "rss_ratio_max": self.rss_goal,
                         "rss_max_kib": self.rss_limit_kib}}
        if self.skip:
            out["met"] = None
            return out
        if self.derived is not None:
            out.update(self.derived)
        else:
            b, p = self.blk.summary(), self.peer.summary() if self.peer else None
            out["blkcache"], out["peer"] = b, p
            out["wall_ratio"] = (b["wall_median"] / p["wall_median"]
                                 if p and p["wall_median"] else None)
            out["rss_ratio"] = (b["rss_median_kib"] / p["rss_median_kib"]
                                if p and b["rss_median_kib"] and p["rss_median_kib"] else None)
            # The median of the ratios run by run (the two sides of a run ran
            # back to back): steadier than the ratio of medians when the
            # machine's load changes during the bench.  Shown, not judged.
            pairs = [x / y for x, y in zip(self.blk.walls, self.peer.walls if self.peer else [])
                     if y > 0]
            out["wall_ratio_paired"] = statistics.median(pairs) if pairs else None
        checks = []
        if self.wall_goal is not None and out.get("wall_ratio") is not None:
            checks.append(out["wall_ratio"] <= self.wall_goal)
        if self.rss_goal is not None and out.get("rss_ratio") is not None:
            checks.append(out["rss_ratio"] <= self.rss_goal)
        if self.rss_limit_kib is not None and out.get("blkcache", {}).get("rss_median_kib"):
            checks.append(out["blkcache"]["rss_median_kib"] <= self.rss_limit_kib)
        out["met"] = all(checks) if checks else None
        return out


def alternate(rows, runs, before=None, warmup=True):
    """Sample every side of rows, alternating the order run by run."""
    sides = [s for r in rows if not r.skip for s in (r.blk, r.peer) if s is not None]
    if warmup:
        for side in sides:
            if before:
                before()
            side.measure()
    for i in range(runs):
        for side in (sides if i % 2 == 0 else list(reversed(sides))):
            if before:
                before()
            side.sample()


# -- the bench -------------------------------------------------------------------

def find_blkcache():
    import blkcache
    pkg = os.path.dirname(os.path.abspath(blkcache.__file__))
    return blkcache, pkg


def console_script(python, workdir):
    """argv of the blkcache console script for this interpreter.

    The installed one if its shebang is this interpreter, else a copy of what
    pip writes for the entry point blkcache = blkcache.cli:main.
    """
    found = shutil.which("blkcache")
    if found:
        with open(found, "rb") as f:
            first = f.readline().decode(errors="replace")
        if first.startswith("#!") and os.path.realpath(first[2:].strip()) == \
                os.path.realpath(python):
            return [found], "installed console script " + found
    path = os.path.join(workdir, "blkcache")
    with open(path, "w") as f:
        f.write(f"#!{python}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                "from blkcache.cli import main\nif __name__ == '__main__':\n"
                "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                "    sys.exit(main())\n")
    os.chmod(path, 0o755)
    return [path], "pip-style console script (generated)"


def compile_c(workdir, name, source):
    """Compile one of the bench's C programs; (path, None) or (None, reason)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        return None, "no C compiler (gcc/cc) for the bench's C programs"
    src = os.path.join(workdir, name + ".c")
    exe = os.path.join(workdir, name)
    with open(src, "w") as f:
        f.write(source)
    proc = subprocess.run([gcc, "-O2", "-o", exe, src], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"gcc failed: {proc.stderr.strip()[:200]}"
    return exe, None


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def fmt_rss(kib):
    return "-" if not kib else f"{kib / 1024:.1f}M"


def fmt_ratio(value):
    return "-" if value is None else f"{value:.3f}"


def print_table(results, out=sys.stdout):
    header = ("ROW", "BLKCACHE", "PEER", "RATIO", "PAIRED", "GOAL", "RSS", "PEER RSS", "RATIO",
              "GOAL", "MET")
    lines = [header]
    for r in results:
        g = r["goals"]
        if r["skipped"]:
            lines.append((r["name"], "skipped: " + r["skipped"]))
            continue
        b, p = r.get("blkcache") or {}, r.get("peer") or {}
        rss_goal = (f"<={g['rss_ratio_max']}" if g["rss_ratio_max"] is not None else
                    f"<={g['rss_max_kib'] // 1024}M" if g["rss_max_kib"] else "-")
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append((r["name"], fmt_time(b.get("wall_median")), fmt_time(p.get("wall_median")),
                      fmt_ratio(r.get("wall_ratio")), fmt_ratio(r.get("wall_ratio_paired")),
                      f"<={g['wall_ratio_max']}" if g["wall_ratio_max"] else "-",
                      fmt_rss(b.get("rss_median_kib")), fmt_rss(p.get("rss_median_kib")),
                      fmt_ratio(r.get("rss_ratio")), rss_goal, met))
    widths = [max(len(line[i]) for line in lines if len(line) == len(header))
              for i in range(len(header))]
    widths[0] = max(len(line[0]) for line in lines)
    for line in lines:
        if len(line) != len(header):
            print(f"{line[0]:<{widths[0]}}  {line[1]}", file=out)
        else:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(line, widths))), file=out)
    print("RATIO: blkcache / peer of the medians, judged against GOAL; PAIRED: median of "
          "the run-by-run ratios (shown, not judged); RSS: peak, median", file=out)
    for r in results:
        if not r["skipped"]:
            peer = (r.get("peer") or {}).get("label")
            print(f"  {r['name']}: {r['what']}" + (f" (peer: {peer})" if peer else ""), file=out)


def build_rows(args, world, runner, workdir, blkcache_mod, pkg_dir):
    py = args.python
    quick = args.quick
    notes = {}
    script, script_note = console_script(py, workdir)
    notes["console_script"] = script_note
    vmtouch = shutil.which("vmtouch")
    blockdev = shutil.which("blockdev")
    fincore = shutil.which("fincore")
    fincore_ver = tool_version([fincore, "--version"]) if fincore else None
    notes["vmtouch"] = vmtouch
    notes["fincore_version"] = ".".join(map(str, fincore_ver)) if fincore_ver else None
    no_vmtouch = None if vmtouch else "vmtouch not installed (apt-get install vmtouch)"
    if not fincore:
        no_fincore = "fincore not installed (util-linux)"
    elif fincore_ver is None or fincore_ver < (2, 40):
        no_fincore = (f"fincore {notes['fincore_version']} < 2.40 reads st_size and sees "
                      "a block device as empty")
    else:
        no_fincore = None
    blk = script  # the console-script entry point: what users run

    def cmd(argv, expect=(0,)):
        return lambda: runner.run(argv, expect)

    # 1. start-up --------------------------------------------------------------
    import_click = [py, "-c", "import click"]
    start = [
        Row("startup", "`blkcache --version` (console script) vs `python -c 'import click'`",
            Side("blkcache --version", cmd(script + ["--version"]), script + ["--version"]),
            Side("import click", cmd(import_click), import_click), wall_goal=1.15),
        Row("startup-m", "`python -m blkcache --version` vs `python -c 'import click'`",
            Side("python -m blkcache --version", cmd([py, "-m", "blkcache", "--version"]),
                 [py, "-m", "blkcache", "--version"]),
            Side("import click", cmd(import_click), import_click), wall_goal=1.15),
    ]
    yield "start-up", start, lambda: alternate(start, 3 if quick else args.runs * 4)

    # 2. status of a big sparse device ---------------------------------------------
    big = 16 * GiB if quick else TiB
    cached = 64 * MiB if quick else 256 * MiB
    dev, fd = world.attach(big, "big.img")
    fill(fd, cached)
    bigname = "16G" if quick else "1T"
    lengths = ("1G",) if quick else ("1G", "64G")
    status_rows = []
    vm = Side(f"vmtouch DEV ({bigname})", cmd([vmtouch, dev]), [vmtouch, dev]) \
        if vmtouch else None
    status_rows.append(Row(
        f"status-{bigname}", f"`blkcache status DEV`, {bigname} sparse device, "
        f"{cached // MiB} MiB cached (cachestat)",
        Side("blkcache status", cmd(blk + ["status", dev]), blk + ["status", dev]), vm,
        wall_goal=0.05, rss_goal=0.15, skip=no_vmtouch))
    for length in lengths:
        peer = [vmtouch, "-p", f"0-{length}", dev]
        status_rows.append(Row(
            f"status-{bigname}-len{length}",
            f"`blkcache status --length {length} DEV` vs `vmtouch -p 0-{length} DEV`",
            Side(f"blkcache status --length {length}",
                 cmd(blk + ["status", "--length", length, dev]),
                 blk + ["status", "--length", length, dev]),
            Side(f"vmtouch -p 0-{length}", cmd(peer), peer) if vmtouch else None,
            skip=no_vmtouch))
    mc = blk + ["status", "--interface", "mincore", dev]
    mc_side = Side("blkcache status --interface mincore", cmd(mc), mc)
    status_rows.append(Row(
        f"status-mincore-{bigname}", f"`blkcache status --interface mincore DEV`, "
        f"{bigname} device (the pre-6.5 kernel path) vs `vmtouch DEV`",
        mc_side, vm, wall_goal=0.75,
        rss_limit_kib=40 * 1024, skip=no_vmtouch))
    fc = [fincore, dev] if fincore else None
    status_rows.append(Row(
        f"status-{bigname}-fincore", "`blkcache status DEV` vs `fincore DEV`",
        Side("blkcache status", cmd(blk + ["status", dev]), blk + ["status", dev]),
        Side("fincore DEV", cmd(fc), fc) if not no_fincore else None, skip=no_fincore))
    # vmtouch DEV is shared by two rows: measure it once per run.
    measured = []
    seen = set()
    for r in status_rows:
        if r.skip:
            continue
        for s in (r.blk, r.peer):
            if id(s) not in seen:
                seen.add(id(s))
                measured.append(s)

    def run_status():
        # Rows sharing one Side object see its samples.
        alternate([Row("x", "", s) for s in measured], 1 if quick else args.runs)
        if not quick:
            # More samples of the quick commands (everything but a whole-device
            # scan): their medians make the flatness rows below.
            slow = {id(vm), id(mc_side), id(status_rows[-1].peer)}
            alternate([Row("x", "", s) for s in measured if id(s) not in slow],
                      args.runs * 2, warmup=False)
    yield "status", status_rows, run_status

    # flatness: blkcache status time against the range length
    flat = []
    for length in lengths:
        a = next(r for r in status_rows if r.name == f"status-{bigname}")
        b = next(r for r in status_rows if r.name == f"status-{bigname}-len{length}")
        row = Row(f"flat-{bigname}/{length}", f"`blkcache status` wall on {bigname} / on "
                  f"--length {length} (flat in device size: about 1)", wall_goal=1.15,
                  skip=a.skip or b.skip)
        row.parts = (a, b)
        flat.append(row)

    def run_flat():
        for row in flat:
            if row.skip:
                continue
            if not (row.parts[0].blk.walls and row.parts[1].blk.walls):
                row.skip = "status rows not run"
                continue
            a, b = row.parts
            wa, wb = statistics.median(a.blk.walls), statistics.median(b.blk.walls)
            row.derived = {"blkcache": {"label": a.blk.label, "wall_median": wa},
                           "peer": {"label": b.blk.label, "wall_median": wb},
                           "wall_ratio": wa / wb}
    yield "flat", flat, run_flat

    # 3. drop of a fully cached device ---------------------------------------------
    dsize = 256 * MiB if quick else GiB
    dname = "256M" if quick else "1G"
    ddev, dfd = world.attach(dsize, "drop.img")

    def refill():
        fill(dfd, dsize)
        time.sleep(SETTLE)

    def composite():
        steps = [import_click, [blockdev, "--flushbufs", ddev], [vmtouch, ddev]]
        walls, rss = 0.0, 0
        for argv in steps:
            w, r = runner.run(argv)
            walls += w
            rss = max(rss, r)
        left = cached_pages(dfd, dsize)
        if left:
            raise BenchError(f"blockdev --flushbufs left {left} pages cached")
        return walls, rss

    def cli_drop():
        out = runner.run(blk + ["drop", ddev])   # exit 0: verified clean
        return out

    no_drop_peer = no_vmtouch or (None if blockdev else "blockdev not installed")
    drop_rows = [Row(
        f"drop-{dname}", f"`blkcache drop DEV`, {dname} device fully cached, vs "
        "`python -c 'import click'` + `blockdev --flushbufs DEV` + `vmtouch DEV`",
        Side("blkcache drop", cli_drop, blk + ["drop", ddev]),
        Side("import click + blockdev --flushbufs + vmtouch", composite,
             ["import click", "blockdev --flushbufs", "vmtouch"]),
        wall_goal=1.2, skip=no_drop_peer)]

    helper = os.path.join(pkg_dir, "blkcache-flush")
    no_helper = None if os.access(helper, os.X_OK) else f"helper {helper} not built"
    if not no_helper and not blockdev:
        no_helper = "blockdev not installed"
    drop_rows.append(Row(
        f"helper-{dname}", f"`blkcache-flush DEV` vs `blockdev --flushbufs DEV`, {dname} "
        "device fully cached",
        Side("blkcache-flush", cmd([helper, ddev]), [helper, ddev]),
        Side("blockdev --flushbufs", cmd([blockdev, "--flushbufs", ddev]),
             [blockdev, "--flushbufs", ddev]),
        wall_goal=1.2, skip=no_helper))
    yield "drop", drop_rows, lambda: alternate(drop_rows, 1 if quick else args.runs * 2,
                                               before=refill)

    # 4. in-process API against C ---------------------------------------------------
    timing, no_c = compile_c(workdir, "timing", C_TIMING)
    inner = 5 if quick else 40

    py_timing = os.path.join(workdir, "timing.py")
    with open(py_timing, "w") as f:
        f.write(PY_TIMING)

    def timed(argv, mode, n):
        """Median seconds per call printed by a timing program (C or Python).

        A drop starts at the same moment after the refill on both sides
        (START_DELAY): how long the cache has sat since it was filled changes
        the kernel's time by more than the difference being measured.
        """
        start = time.monotonic() + START_DELAY if mode == "drop" else 0
        proc = subprocess.run([*argv, mode, ddev, str(n), f"{start:.6f}"],
                              capture_output=True, text=True, timeout=120, env=runner.env)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} {mode}: {proc.stderr.strip()}")
        vals = [line.split() for line in proc.stdout.split("\n") if line.strip()]
        if mode == "drop" and int(vals[0][1]) != 0:
            raise BenchError(f"{' '.join(argv)} drop left {vals[0][1]} pages cached")
        return statistics.median(float(v[0]) for v in vals), None

    py = [args.python, py_timing]
    c = [timing]

    api_rows = [
        Row(f"api-drop-{dname}", f"`blkcache.drop(DEV)` vs C (open, fstat, BLKGETSIZE64, "
            f"cachestat, fdatasync, BLKFLSBUF, cachestat, close), {dname} fully cached; "
            "each timed around the call in a fresh process, 0.25 s after the refill, "
            "right after an untimed status call",
            Side("blkcache.drop()", lambda: timed(py, "drop", 1), py + ["drop"]),
            Side("C", lambda: timed(c, "drop", 1), c + ["drop"]), wall_goal=1.05, skip=no_c),
        Row(f"api-status-{dname}", f"`blkcache.status(DEV)` vs C (open, fstat, BLKGETSIZE64, "
            f"cachestat, close), {dname} fully cached; median of {inner} calls",
            Side("blkcache.status()", lambda: timed(py, "status", inner), py + ["status"]),
            Side("C", lambda: timed(c, "status", inner), c + ["status"]),
            wall_goal=1.2, skip=no_c),
    ]
    empty_rows = [
        Row("api-status-empty", "the same on an uncached device: the fixed cost of a "
            "call (no goal)",
            Side("blkcache.status()", lambda: timed(py, "status", inner), py + ["status"]),
            Side("C", lambda: timed(c, "status", inner), c + ["status"]), skip=no_c)]

    def run_api():
        # the drop row needs a refill before every sample; status rows do not
        alternate(api_rows[:1], 1 if quick else args.runs * 10, before=refill)
        refill()
        alternate(api_rows[1:], 1 if quick else args.runs)
        blkcache_mod.drop(ddev)
        alternate(empty_rows, 1 if quick else args.runs)
    yield "api", api_rows + empty_rows, run_api
    world.notes.update(notes)


def machine_info(python):
    info = {"kernel": platform.release(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": python,
            "python_version": platform.python_version()}
    try:
        from importlib.metadata import version
        info["click"] = version("click")
    except Exception:
        info["click"] = None
    ver = tool_version(["vmtouch", "-h"]) if shutil.which("vmtouch") else None
    info["vmtouch"] = ".".join(map(str, ver)) if ver else None
    ver = tool_version(["blockdev", "--version"]) if shutil.which("blockdev") else None
    info["util_linux"] = ".".join(map(str, ver)) if ver else None
    return info


def child_env(workdir):
    """The environment for the measured commands.

    Byte code is cached in a directory of the bench (PYTHONPYCACHEPREFIX),
    for every side alike: an installed package has its .pyc files, but a
    source tree run with PYTHONDONTWRITEBYTECODE=1 would compile blkcache at
    every start, and the bench must not write into the source tree.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run in seconds: small devices, one run, no warm-up")
    p.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for blkcache and the click baseline (default: this one)")
    p.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    p.add_argument("--table", metavar="JSON", help="print the table of an earlier run and exit")
    p.add_argument("--only", metavar="GROUP,...",
                   help="run only these groups: start-up, status, flat, drop, api")
    return p.parse_args(argv)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print_table(json.load(f)["rows"])
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, BLKFLSBUF)", file=sys.stderr)
        return 2
    if shutil.which("losetup") is None:
        print("bench: losetup(8) not found", file=sys.stderr)
        return 2
    blkcache_mod, pkg_dir = find_blkcache()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    world = World()
    world.notes = {"workdir": world.workdir}
    runner = None
    results = []
    try:
        print(f"bench: workdir {world.workdir}", file=sys.stderr, flush=True)
        launcher, no_launcher = compile_c(world.workdir, "launch", C_LAUNCH)
        world.notes["rss"] = no_launcher or "ru_maxrss of the child, via a small C launcher"
        runner = Runner(world.workdir, child_env(world.workdir), launcher)
        for title, rows, run in build_rows(args, world, runner, world.workdir,
                                           blkcache_mod, pkg_dir):
            if args.only and title not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            run()
            print(f"bench: {title}: {time.perf_counter() - t0:.1f}s", file=sys.stderr,
                  flush=True)
            results.extend(row.result() for row in rows)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not stop the clean-up half way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if runner:
                runner.close()
            world.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elapsed = time.perf_counter() - started
    report = {"machine": machine_info(args.python), "quick": args.quick, "runs": args.runs,
              "blkcache": pkg_dir, "notes": world.notes, "elapsed_s": elapsed,
              "rows": results}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_table(results)
    print(f"bench: {elapsed:.0f}s, JSON in {args.json}", file=sys.stderr)
    missed = [r["name"] for r in results if r["met"] is False]
    if missed:
        print(f"bench: goals missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
