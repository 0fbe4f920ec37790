#!/usr/bin/env python3
"""Benchmark blkcache against its peers on scratch loop devices.

Run as root, with the interpreter that runs blkcache (the package must be
importable: installed, or PYTHONPATH pointing at the source tree):

    python bench/bench.py                 # full run, several minutes
    python bench/bench.py --quick         # smoke run, seconds (CI)
    python bench/bench.py --json out.json --runs 7 --check

Each scenario is prepared on loop devices over sparse files in /var/tmp,
held open by this process so their page cache stays.  The commands of a row
run alternately (blkcache first on even runs, the peer first on odd runs);
the table shows medians of wall time and peak RSS (os.wait4's ru_maxrss of
the child) and the ratios blkcache / peer, against the goals of issues 6 and
14.  A second table shows how status, drop, verify --coherence and status
--holders grow with the cache and with the number of processes.  Peers
that are missing (vmtouch, fincore >= 2.40, fuser, the blkcache-flush
helper, gcc for the C programs) are reported as skipped rows.  The bench
installs nothing.  Every loop device it attached and every process it
started is undone on exit, also on Ctrl-C or SIGTERM.

The C and Python programs it runs are the files beside it: launch.c (runs a
command, reports wall time and peak RSS), timing.c and api_timing.py (the
in-process API against raw syscalls).
"""

import argparse
import json
import math
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
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
# The tests' independent view of the kernel (raw cachestat by ctypes, not blkcache).
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import kernel  # noqa: E402

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
#: A fill is good enough when reclaim left this share of the pages read.
FILLED = 0.99


class BenchError(Exception):
    pass


def cached_pages(fd, offset=0, length=0):
    """Pages of fd cached in the range by raw cachestat(2); None if unavailable."""
    try:
        return kernel.cachestat(fd, offset, length)["nr_cache"]
    except OSError:
        return None


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
    """Loop devices over sparse files, held open, and idle processes; all
    undone by close()."""

    def __init__(self):
        from blkcache import loop

        self.loop = loop
        self.workdir = tempfile.mkdtemp(prefix="blkcache-bench-", dir="/var/tmp")
        self.devices = []
        self.fds = []
        self.pids = []
        self.notes = {"workdir": self.workdir}

    def image(self, size, name, data=0):
        """A sparse file of size bytes; its first ``data`` bytes not zero
        (8 MiB of random bytes, repeated), written to the disk."""
        path = os.path.join(self.workdir, name)
        with open(path, "wb") as f:
            f.truncate(size)
            block = os.urandom(min(8 * MiB, data)) if data else b""
            for off in range(0, data, len(block) or 1):
                f.write(block[:data - off])
            f.flush()
            os.fsync(f.fileno())
            # The loop device reads with O_DIRECT: no second copy in memory.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return path

    def attach(self, size, name, data=0):
        """A loop device (direct I/O to its backing file: its own page cache
        is the only copy, as on a real host), and an fd holding it open."""
        path = self.image(size, name, data)
        # Ctrl-C or SIGTERM between losetup attaching and our noting the
        # device would leak it: hold those signals until it is noted.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            device = self.loop.attach(path, direct_io=True)
            self.devices.append(device)
        except Exception as exc:
            raise BenchError(f"losetup {path}: {exc}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return device, fd

    def spawn(self, count):
        """Start count idle processes (sleep), stopped by reap() or close()."""
        sleep = shutil.which("sleep")
        if sleep is None:
            raise BenchError("sleep(1) not found")
        with open(os.devnull, "rb") as null:
            actions = [(os.POSIX_SPAWN_DUP2, null.fileno(), 0),
                       (os.POSIX_SPAWN_DUP2, null.fileno(), 1)]
            for _ in range(count):
                held = signal.pthread_sigmask(signal.SIG_BLOCK,
                                              {signal.SIGINT, signal.SIGTERM})
                try:
                    self.pids.append(os.posix_spawn(sleep, [sleep, "3600"], os.environ,
                                                    file_actions=actions))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def reap(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.pids.clear()

    def close(self):
        self.reap()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        problems = []
        for device in reversed(self.devices):
            try:
                self.loop.detach(device)
            except Exception as exc:
                problems.append(f"{device}: {exc}")
        self.devices.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if problems:
            raise BenchError("could not detach " + "; ".join(problems))


def read_range(fd, offset, length):
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    pos, end = offset, offset + length
    while pos < end:
        n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
        if n <= 0:
            break
        pos += n


def fill(fd, length, offset=0):
    """Read [offset, offset+length) through fd so that its pages are cached.

    Reclaim may take a few pages right after they are read: read again, and
    accept FILLED of them."""
    want = length // PAGE
    for _ in range(5):
        read_range(fd, offset, length)
        got = cached_pages(fd, offset, length)
        if got is None or got >= want:
            return
    if got < FILLED * want:
        raise BenchError(f"fill: only {got} of {want} pages cached")


# -- running commands -----------------------------------------------------------

class Runner:
    """Runs a command with stdout on /dev/null: (wall seconds, peak RSS KiB).

    Through the small C launcher when there is one (launch.c); else with
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
                 rss_limit_kib=None, skip=None, scale=None):
        self.name, self.what = name, what
        self.blk, self.peer = blk, peer
        self.wall_goal, self.rss_goal, self.rss_limit_kib = wall_goal, rss_goal, rss_limit_kib
        self.skip = skip
        #: For the scaling table: (operation, amount, unit).
        self.scale = scale
        self.derived = None     # (wall_ratio) for rows computed from others

    def result(self):
        out = {"name": self.name, "what": self.what, "skipped": self.skip,
               "goals": {"wall_ratio_max": self.wall_goal, "rss_ratio_max": self.rss_goal,
                         "rss_max_kib": self.rss_limit_kib}}
        if self.scale:
            out["scale"] = dict(zip(("operation", "amount", "unit"), self.scale))
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


#: A titled group of rows and the function that measures them.
Group = namedtuple("Group", "title rows run")


# -- the bench's context ----------------------------------------------------------

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


def compile_c(workdir, name):
    """Compile bench/NAME.c into workdir; (path, None) or (None, reason)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        return None, "no C compiler (gcc/cc) for the bench's C programs"
    exe = os.path.join(workdir, name)
    proc = subprocess.run([gcc, "-O2", "-o", exe, os.path.join(HERE, name + ".c")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"gcc failed: {proc.stderr.strip()[:200]}"
    return exe, None


TOOLS = {"vmtouch": "vmtouch", "blockdev": "util-linux", "fincore": "util-linux",
         "fuser": "psmisc", "dd": "coreutils", "sh": "dash"}


class Bench:
    """What every scenario needs: options, the world, the runner, the tools."""

    def __init__(self, args, world, runner, blkcache_mod, pkg_dir):
        self.args, self.quick, self.py = args, args.quick, args.python
        self.world, self.runner = world, runner
        self.blkcache_mod, self.pkg_dir = blkcache_mod, pkg_dir
        self.notes = world.notes
        self.blk, self.notes["console_script"] = console_script(self.py, world.workdir)
        self.tools = {name: shutil.which(name) for name in TOOLS}
        self.notes["vmtouch"] = self.tools["vmtouch"]

    def missing(self, *names):
        """Why a row cannot run (the first of these tools not installed), or None."""
        for name in names:
            if not self.tools[name]:
                return f"{name} not installed (apt-get install {TOOLS[name]})"
        return None

    def side(self, label, argv, expect=(0,)):
        return Side(label, lambda: self.runner.run(argv, expect), argv)

    def runs(self, factor=1):
        """Runs per row: one when quick, else --runs times factor."""
        return 1 if self.quick else self.args.runs * factor

    def size(self, quick, full):
        return quick if self.quick else full


def size_name(size):
    for unit, name in ((TiB, "T"), (GiB, "G"), (MiB, "M")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return str(size)


# -- the scenarios ---------------------------------------------------------------

def startup(b):
    import_click = [b.py, "-c", "import click"]
    rows = [
        Row("startup", "`blkcache --version` (console script) vs `python -c 'import click'`",
            b.side("blkcache --version", b.blk + ["--version"]),
            b.side("import click", import_click), wall_goal=1.15),
        Row("startup-m", "`python -m blkcache --version` vs `python -c 'import click'`",
            b.side("python -m blkcache --version", [b.py, "-m", "blkcache", "--version"]),
            b.side("import click", import_click), wall_goal=1.15),
    ]
    return [Group("start-up", rows, lambda: alternate(rows, 3 if b.quick else b.args.runs * 4))]


def _fincore_problem(b):
    fincore = b.tools["fincore"]
    if not fincore:
        return b.missing("fincore")
    version = tool_version([fincore, "--version"])
    b.notes["fincore_version"] = ".".join(map(str, version)) if version else None
    if version is None or version < (2, 40):
        return (f"fincore {b.notes['fincore_version']} < 2.40 reads st_size and sees "
                "a block device as empty")
    return None


def status(b):
    """status of a big sparse device, against vmtouch and fincore; its flatness."""
    big, cached = b.size(16 * GiB, TiB), b.size(64 * MiB, 256 * MiB)
    bigname = size_name(big)
    lengths = ("1G",) if b.quick else ("1G", "64G")
    dev, fd = b.world.attach(big, "big.img")
    fill(fd, cached)
    vmtouch, no_vmtouch = b.tools["vmtouch"], b.missing("vmtouch")
    no_fincore = _fincore_problem(b)
    st = b.blk + ["status", dev]
    vm = b.side(f"vmtouch DEV ({bigname})", [vmtouch, dev]) if vmtouch else None
    rows = [Row(f"status-{bigname}", f"`blkcache status DEV`, {bigname} sparse device, "
                f"{cached // MiB} MiB cached (cachestat)",
                b.side("blkcache status", st), vm, wall_goal=0.05, rss_goal=0.15,
                skip=no_vmtouch)]
    for length in lengths:
        rows.append(Row(
            f"status-{bigname}-len{length}",
            f"`blkcache status --length {length} DEV` vs `vmtouch -p 0-{length} DEV`",
            b.side(f"blkcache status --length {length}",
                   b.blk + ["status", "--length", length, dev]),
            b.side(f"vmtouch -p 0-{length}", [vmtouch, "-p", f"0-{length}", dev])
            if vmtouch else None, skip=no_vmtouch))
    mincore = b.side("blkcache status --interface mincore",
                     b.blk + ["status", "--interface", "mincore", dev])
    rows.append(Row(f"status-mincore-{bigname}", "`blkcache status --interface mincore DEV`, "
                    f"{bigname} device (the pre-6.5 kernel path) vs `vmtouch DEV`",
                    mincore, vm, wall_goal=0.75, rss_limit_kib=40 * 1024, skip=no_vmtouch))
    fincore = b.side("fincore DEV", [b.tools["fincore"], dev]) if not no_fincore else None
    rows.append(Row(f"status-{bigname}-fincore", "`blkcache status DEV` vs `fincore DEV`",
                    b.side("blkcache status", st), fincore, skip=no_fincore))
    # vmtouch DEV is shared by two rows: measure each distinct side once per run.
    measured = list({id(s): s for r in rows if not r.skip
                     for s in (r.blk, r.peer) if s is not None}.values())
    slow = {id(vm), id(mincore), id(fincore)}

    def run():
        alternate([Row("x", "", s) for s in measured], b.runs())
        if not b.quick:
            # More samples of the quick commands (everything but a whole-device
            # scan): their medians make the flatness rows.
            alternate([Row("x", "", s) for s in measured if id(s) not in slow],
                      b.runs(2), warmup=False)

    flat = []
    for length in lengths:
        whole, part = rows[0], next(r for r in rows if r.name.endswith(f"-len{length}"))
        row = Row(f"flat-{bigname}/{length}", f"`blkcache status` wall on {bigname} / on "
                  f"--length {length} (flat in device size: about 1)", wall_goal=1.15,
                  skip=whole.skip or part.skip)
        row.parts = (whole, part)
        flat.append(row)

    def run_flat():
        for row in flat:
            if row.skip:
                continue
            whole, part = row.parts
            if not (whole.blk.walls and part.blk.walls):
                row.skip = "status rows not run"
                continue
            wa, wb = statistics.median(whole.blk.walls), statistics.median(part.blk.walls)
            row.derived = {"blkcache": {"label": whole.blk.label, "wall_median": wa},
                           "peer": {"label": part.blk.label, "wall_median": wb},
                           "wall_ratio": wa / wb}

    return [Group("status", rows, run), Group("flat", flat, run_flat)]


def drop(b):
    """blkcache drop against BLKFLSBUF by blockdev plus a vmtouch check."""
    size = b.size(256 * MiB, GiB)
    name = size_name(size)
    dev, fd = b.world.attach(size, "drop.img")
    blockdev, vmtouch = b.tools["blockdev"], b.tools["vmtouch"]

    def refill():
        fill(fd, size)
        time.sleep(SETTLE)

    def composite():
        walls, rss = 0.0, 0
        for argv in ([b.py, "-c", "import click"], [blockdev, "--flushbufs", dev],
                     [vmtouch, dev]):
            wall, peak = b.runner.run(argv)
            walls += wall
            rss = max(rss, peak or 0)
        left = cached_pages(fd, 0, size)
        if left:
            raise BenchError(f"blockdev --flushbufs left {left} pages cached")
        return walls, rss or None

    rows = [Row(
        f"drop-{name}", f"`blkcache drop DEV`, {name} device fully cached, vs "
        "`python -c 'import click'` + `blockdev --flushbufs DEV` + `vmtouch DEV`",
        b.side("blkcache drop", b.blk + ["drop", dev]),    # exit 0: verified clean
        Side("import click + blockdev --flushbufs + vmtouch", composite,
             ["import click", "blockdev --flushbufs", "vmtouch"]),
        wall_goal=1.0, skip=b.missing("vmtouch", "blockdev"))]
    helper = os.path.join(b.pkg_dir, "blkcache-flush")
    no_helper = None if os.access(helper, os.X_OK) else f"helper {helper} not built"
    rows.append(Row(
        f"helper-{name}", f"`blkcache-flush DEV` vs `blockdev --flushbufs DEV`, {name} "
        "device fully cached",
        b.side("blkcache-flush", [helper, dev]),
        b.side("blockdev --flushbufs", [blockdev, "--flushbufs", dev]),
        wall_goal=1.2, skip=no_helper or b.missing("blockdev")))
    return [Group("drop", rows, lambda: alternate(rows, b.runs(2), before=refill))]


def api(b):
    """blkcache.status() and drop() in process against the same syscalls in C."""
    size = b.size(256 * MiB, GiB)
    name = size_name(size)
    dev, fd = b.world.attach(size, "api.img")
    timing, no_c = compile_c(b.world.workdir, "timing")
    inner = 5 if b.quick else 40
    py, c = [b.py, os.path.join(HERE, "api_timing.py")], [timing]

    def refill():
        fill(fd, size)
        time.sleep(SETTLE)

    def timed(argv, mode, n):
        """Median seconds per call printed by a timing program (C or Python).

        A drop starts at the same moment after the refill on both sides
        (START_DELAY): how long the cache has sat since it was filled changes
        the kernel's time by more than the difference being measured.
        """
        start = time.monotonic() + START_DELAY if mode == "drop" else 0
        proc = subprocess.run([*argv, mode, dev, str(n), f"{start:.6f}"],
                              capture_output=True, text=True, timeout=120,
                              env=b.runner.env)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} {mode}: {proc.stderr.strip()}")
        vals = [line.split() for line in proc.stdout.split("\n") if line.strip()]
        if mode == "drop" and int(vals[0][1]) != 0:
            raise BenchError(f"{' '.join(argv)} drop left {vals[0][1]} pages cached")
        return statistics.median(float(v[0]) for v in vals), None

    def pair(mode, n):
        return (Side(f"blkcache.{mode}()", lambda: timed(py, mode, n), py + [mode]),
                Side("C", lambda: timed(c, mode, n), c + [mode]))

    rows = [
        Row(f"api-drop-{name}", f"`blkcache.drop(DEV)` vs C (open, fstat, BLKGETSIZE64, "
            f"cachestat, fdatasync, BLKFLSBUF, cachestat, close), {name} fully cached; "
            "each timed around the call in a fresh process, 0.25 s after the refill, "
            "right after an untimed status call", *pair("drop", 1), wall_goal=1.05,
            skip=no_c),
        Row(f"api-status-{name}", f"`blkcache.status(DEV)` vs C (open, fstat, BLKGETSIZE64, "
            f"cachestat, close), {name} fully cached; median of {inner} calls",
            *pair("status", inner), wall_goal=1.2, skip=no_c),
    ]
    empty = [Row("api-status-empty", "the same on an uncached device: the fixed cost of a "
                 "call (no goal)", *pair("status", inner), skip=no_c)]

    def run():
        # the drop row needs a refill before every sample; status rows do not
        alternate(rows[:1], b.runs(10), before=refill)
        refill()
        alternate(rows[1:], b.runs())
        b.blkcache_mod.drop(dev)
        alternate(empty, b.runs())
    return [Group("api", rows + empty, run)]


def scattered_pieces(size, share, seed=14):
    """Sorted offsets of 1 MiB pieces covering ``share`` of [0, size), at random."""
    import random

    count = max(1, round(size // MiB * share))
    return sorted(p * MiB for p in random.Random(seed).sample(range(size // MiB), count))


def fill_pieces(device, pieces):
    """Cache exactly these 1 MiB pieces: read through an fd without readahead."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(3):
            for off in pieces:
                read_range(fd, off, MiB)
            got = sum(cached_pages(fd, off, MiB) or 0 for off in pieces)
            if got >= len(pieces) * MiB // PAGE:
                return
        if got < FILLED * len(pieces) * MiB // PAGE:
            raise BenchError(f"fill: only {got} of {len(pieces) * MiB // PAGE} pages cached")
    finally:
        os.close(fd)


def coherence(b):
    """verify --coherence against an O_DIRECT dd of the same bytes."""
    data = b.size(64 * MiB, GiB)
    name = size_name(data)
    dev, fd = b.world.attach(2 * data, "coherence.img", data=data)
    no_dd = b.missing("dd", "sh")
    verify = b.blk + ["verify", "--coherence", dev]
    dd = [b.tools["dd"], f"if={dev}", "of=/dev/null", "bs=4M", f"count={data // (4 * MiB)}",
          "iflag=direct", "status=none"]
    full = [Row(f"coherence-{name}", f"`blkcache verify --coherence DEV`, {name} of random "
                f"data fully cached (clean), vs `dd if=DEV of=/dev/null bs=4M "
                f"count={data // (4 * MiB)} iflag=direct` (the same bytes read once)",
                b.side("blkcache verify --coherence", verify), b.side("dd iflag=direct", dd),
                wall_goal=1.5, skip=no_dd)]
    pieces = scattered_pieces(data, 0.10)
    script = os.path.join(b.world.workdir, "dd-pieces.sh")
    with open(script, "w") as f:
        f.write("set -e\n" + "".join(
            f"{b.tools['dd']} if={dev} of=/dev/null bs=1M count=1 skip={off // MiB} "
            "iflag=direct status=none\n" for off in pieces))
    part = [Row(f"coherence-{name}-10pct", f"the same with 10 % of the {name} cached in "
                f"{len(pieces)} scattered 1 MiB pieces, vs `dd ... bs=1M count=1 "
                "skip=PIECE iflag=direct` of each piece (one sh script)",
                b.side("blkcache verify --coherence", verify),
                b.side("dd iflag=direct of each piece", [b.tools["sh"], script]),
                wall_goal=1.5, skip=no_dd)]

    def run():
        alternate(full, b.runs(), before=lambda: fill(fd, data))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fill_pieces(dev, pieces)
        alternate(part, b.runs(), before=lambda: fill_pieces(dev, pieces))
    return [Group("coherence", full + part, run)]


def holders(b):
    """status --holders with thousands of other processes, against fuser."""
    count = b.size(100, 2000)
    dev, _ = b.world.attach(16 * MiB, "holders.img")
    fuser = [b.tools["fuser"], "-v", dev] if b.tools["fuser"] else None
    rows = [Row(f"holders-{count}", f"`blkcache status --holders DEV` vs `fuser -v DEV`, "
                f"{count} other processes running (the bench holds the device)",
                b.side("blkcache status --holders", b.blk + ["status", "--holders", dev]),
                b.side("fuser -v", fuser) if fuser else None, wall_goal=1.0,
                skip=b.missing("fuser"))]

    def run():
        b.world.spawn(count)
        try:
            alternate(rows, b.runs())
        finally:
            b.world.reap()
    return [Group("holders", rows, run)]


def scaling(b):
    """How status, drop and verify --coherence grow with the pages cached, and
    status --holders with the processes running."""
    sizes = (4 * MiB, 16 * MiB, 64 * MiB) if b.quick else (64 * MiB, GiB, 4 * GiB)
    counts = (10, 50, 100) if b.quick else (100, 1000, 2000)
    dev, fd = b.world.attach(sizes[-1] + 64 * MiB, "scale.img", data=sizes[-1])
    hdev, _ = b.world.attach(16 * MiB, "scale-holders.img")
    rows = {}
    for size in sizes:
        name = size_name(size)
        for op, argv in (("status", ["status", dev]),
                         ("verify --coherence", ["verify", "--coherence", dev]),
                         ("drop", ["drop", dev])):
            rows[op, size] = Row(
                f"scale-{op.split()[-1].lstrip('-')}-{name}",
                f"`blkcache {' '.join(argv[:-1])} DEV`, {name} cached",
                b.side(f"blkcache {op}", b.blk + argv), scale=(op, size, "bytes cached"))
    for count in counts:
        rows["holders", count] = Row(
            f"scale-holders-{count}", f"`blkcache status --holders DEV`, {count} other "
            "processes", b.side("blkcache status --holders", b.blk + ["status", "--holders",
                                                                      hdev]),
            scale=("status --holders", count, "processes"))

    def run():
        for size in sizes:
            fill(fd, size)
            for op in ("status", "verify --coherence"):
                alternate([rows[op, size]], b.runs(), before=lambda s=size: fill(fd, s))
            alternate([rows["drop", size]], b.runs(), before=lambda s=size: fill(fd, s))
        try:
            for count in counts:
                b.world.spawn(count - len(b.world.pids))
                alternate([rows["holders", count]], b.runs())
        finally:
            b.world.reap()
    return [Group("scaling", list(rows.values()), run)]


#: Scenarios in the order they run, with the titles of the groups they make.
SCENARIOS = [(("start-up",), startup), (("status", "flat"), status), (("drop",), drop),
             (("api",), api), (("coherence",), coherence), (("holders",), holders),
             (("scaling",), scaling)]


# -- output ------------------------------------------------------------------------

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


def _print_columns(lines, out):
    widths = [max(len(line[i]) for line in lines if len(line) == len(lines[0]))
              for i in range(len(lines[0]))]
    widths[0] = max(len(line[0]) for line in lines)
    for line in lines:
        if len(line) != len(lines[0]):
            print(f"{line[0]:<{widths[0]}}  {line[1]}", file=out)
        else:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(line, widths))), file=out)


def print_table(results, out=sys.stdout):
    results = [r for r in results if "scale" not in r]
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
    _print_columns(lines, out)
    print("RATIO: blkcache / peer of the medians, judged against GOAL; PAIRED: median of "
          "the run-by-run ratios (shown, not judged); RSS: peak, median", file=out)
    for r in results:
        if not r["skipped"]:
            peer = (r.get("peer") or {}).get("label")
            print(f"  {r['name']}: {r['what']}" + (f" (peer: {peer})" if peer else ""), file=out)


def growth(points):
    """The exponent k of time ~ amount^k between the last two points (where a
    fixed cost such as start-up weighs least), and a word for it."""
    (a0, t0), (a1, t1) = points[-2], points[-1]
    if not (t0 and t1) or a1 == a0:
        return None, "-"
    k = math.log(t1 / t0) / math.log(a1 / a0)
    word = ("flat" if k < 0.15 else "sublinear" if k < 0.8 else
            "linear" if k < 1.2 else "superlinear")
    return k, word


def print_scaling(results, out=sys.stdout):
    """The scaling table: one line per operation, one column per amount."""
    ops = {}
    for r in results:
        if "scale" in r and not r["skipped"]:
            s = r["scale"]
            ops.setdefault((s["unit"], s["operation"]), []).append(
                (s["amount"], r["blkcache"]["wall_median"]))
    if not ops:
        return
    print("\nSCALING: median wall time; k: time grows as amount^k between the last two "
          "columns (0 flat, 1 linear)", file=out)
    for unit in dict.fromkeys(u for u, _ in ops):
        table = [(op, pts) for (u, op), pts in ops.items() if u == unit]
        amounts = [a for a, _ in table[0][1]]
        names = [size_name(a) if unit == "bytes cached" else f"{a:,}" for a in amounts]
        lines = [(f"{unit.upper()}:", *names, "k", "GROWTH")]
        for op, pts in table:
            k, word = growth(pts)
            lines.append((op, *(fmt_time(t) for _, t in pts),
                          "-" if k is None else f"{k:.2f}", word))
        _print_columns(lines, out)


def machine_info(python):
    info = {"kernel": platform.release(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": python,
            "python_version": platform.python_version(),
            "loadavg_start": os.getloadavg()}
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
    p.add_argument("--table", metavar="JSON", help="print the tables of an earlier run and exit")
    titles = ", ".join(t for titles, _ in SCENARIOS for t in titles)
    p.add_argument("--only", metavar="GROUP,...", help=f"run only these groups: {titles}")
    return p.parse_args(argv)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def measure(bench, only):
    """Run the scenarios (those of ``only`` if given); the results of their rows."""
    results = []
    for titles, scenario in SCENARIOS:
        if only and not only.intersection(titles):
            continue
        for group in scenario(bench):
            if only and group.title not in only:
                continue
            t0 = time.perf_counter()
            group.run()
            print(f"bench: {group.title}: {time.perf_counter() - t0:.1f}s", file=sys.stderr,
                  flush=True)
            results.extend(row.result() for row in group.rows)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            rows = json.load(f)["rows"]
        print_table(rows)
        print_scaling(rows)
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
    info = machine_info(args.python)
    world = World()
    runner = None
    try:
        print(f"bench: workdir {world.workdir}", file=sys.stderr, flush=True)
        launcher, no_launcher = compile_c(world.workdir, "launch")
        world.notes["rss"] = no_launcher or "ru_maxrss of the child, via a small C launcher"
        runner = Runner(world.workdir, child_env(world.workdir), launcher)
        bench = Bench(args, world, runner, blkcache_mod, pkg_dir)
        results = measure(bench, set(args.only.split(",")) if args.only else None)
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
    info["loadavg_end"] = os.getloadavg()
    report = {"machine": info, "quick": args.quick, "runs": args.runs,
              "blkcache": pkg_dir, "notes": world.notes, "elapsed_s": elapsed,
              "rows": results}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_table(results)
    print_scaling(results)
    print(f"bench: {elapsed:.0f}s, load average {info['loadavg_start'][0]:.2f} at the start, "
          f"{info['loadavg_end'][0]:.2f} at the end; JSON in {args.json}", file=sys.stderr)
    missed = [r["name"] for r in results if r["met"] is False]
    if missed:
        print(f"bench: goals missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
