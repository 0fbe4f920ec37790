"""Load: concurrent drops, a writer and readers on one device; nothing lost.

For BLKCACHE_LOAD_SECONDS (default 20) several `blkcache drop` loops (BLKFLSBUF,
posix_fadvise on the whole device and on ranges, plus status/verify) run while
a writer process does buffered writes of a known pattern with an fsync now and
then, and reader processes do buffered reads.  Then every byte of the device,
read with O_DIRECT, must be what the writer last wrote there.  The only exit
codes allowed from blkcache are 0 and the documented transient 1 (pages
remain: the writer and readers cache pages again while drop runs).
"""

import collections
import json
import os
import subprocess
import sys
import threading
import time

import cliproc
import kernel
from units import MiB

CHUNK = 64 << 10
SIZE = 32 * MiB
SECONDS = float(os.environ.get("BLKCACHE_LOAD_SECONDS", "20"))

WRITER = r"""
import json, os, random, sys, time
device, out = sys.argv[1], sys.argv[5]
size, chunk, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def pattern(idx, rnd):
    return (b"%08x%08x" % (idx, rnd)) * (chunk // 16)
fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
last = {}
rng = random.Random(5)
writes = syncs = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    idx = rng.randrange(size // chunk)
    rnd = last.get(idx, 0) + 1
    os.pwrite(fd, pattern(idx, rnd), idx * chunk)
    last[idx] = rnd
    writes += 1
    if writes % 64 == 0:
        os.fsync(fd)
        syncs += 1
os.fsync(fd)
os.close(fd)
with open(out, "w") as f:
    json.dump({"last": last, "writes": writes, "syncs": syncs + 1}, f)
"""

READER = r"""
import os, random, sys, time
device, size, seconds, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
rng = random.Random(seed)
total = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    off = rng.randrange(size // 4096) * 4096
    total += len(os.pread(fd, min(1 << 20, size - off), off))
print(total)
"""


def pattern(idx, rnd):
    if rnd == 0:
        return bytes(CHUNK)
    return (b"%08x%08x" % (idx, rnd)) * (CHUNK // 16)


def test_drops_under_load_lose_nothing(loops, scratch_dir):
    device = loops.attach(size=SIZE)
    loops.hold(device)
    report = os.path.join(scratch_dir, "writer.json")
    env = cliproc.env()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, device, str(SIZE), str(CHUNK),
                               str(SECONDS), report], env=env)
    readers = [subprocess.Popen([sys.executable, "-c", READER, device, str(SIZE),
                                 str(SECONDS), str(seed)], stdout=subprocess.PIPE, env=env)
               for seed in (1, 2)]
    deadline = time.monotonic() + SECONDS
    codes = collections.Counter()
    bad = []
    crashed = []
    dirty_seen = []
    lock = threading.Lock()

    def loop(argv):
        # Any exception (a traceback, a timeout, bad JSON) is collected: a
        # thread that dies is a failure, not a warning.
        try:
            while time.monotonic() < deadline:
                code, out, err = cliproc.run(*argv, timeout=120)
                if argv[0] == "drop" and "--json" in argv and out:
                    dirty = json.loads(out)["devices"][0]["before"]["dirty"] or 0
                    with lock:
                        dirty_seen.append(dirty)
                with lock:
                    codes[(argv[0], code)] += 1
                    allowed = {"drop": (0, 1), "verify": (0, 1), "status": (0,)}[argv[0]]
                    if code not in allowed or err:
                        bad.append((argv, code, err))
        except BaseException as exc:       # noqa: B036 -- reported below, with argv
            with lock:
                crashed.append((argv, repr(exc)))

    drops = [["drop", "--retries", "2", device],
             ["drop", "--retries", "2", "--method", "fadvise", device],
             ["drop", "--retries", "1", "--method", "fadvise", "--offset", "8M",
              "--length", "5M", device],
             ["drop", "--method", "ioctl", "--json", device],
             ["verify", device], ["status", "--json", device]]
    threads = [threading.Thread(target=loop, args=(argv,), name=" ".join(argv[:-1]),
                                daemon=True) for argv in drops]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0, deadline + 180 - time.monotonic()))
        hung = [thread.name for thread in threads if thread.is_alive()]
        assert not hung, f"blkcache runs still going 180 s after the load ended: {hung}"
        assert writer.wait(timeout=SECONDS + 60) == 0
        read_bytes = sum(int(r.communicate(timeout=60)[0]) for r in readers)
        assert all(r.returncode == 0 for r in readers)
    finally:
        for proc in [writer, *readers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert not crashed, crashed
    assert not bad, bad[:5]
    with open(report) as f:
        written = json.load(f)
    last = {int(k): v for k, v in written["last"].items()}
    # Every byte on the device is what the writer last wrote there.
    direct = kernel.read_direct(device, 0, SIZE)
    wrong = [idx for idx in range(SIZE // CHUNK)
             if direct[idx * CHUNK:(idx + 1) * CHUNK] != pattern(idx, last.get(idx, 0))]
    assert not wrong, f"{len(wrong)} chunks lost, first at {wrong[0] * CHUNK}"
    # And after a last drop, buffered reads see the same bytes.
    code, out, err = cliproc.run("drop", device)
    assert (code, err) == (0, ""), out
    assert kernel.cached_pages(device) == 0
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert kernel.read_buffered(fd, 0, SIZE) == direct
    finally:
        os.close(fd)
    runs = sum(codes.values())
    print(f"\nload: {SECONDS:g} s, {written['writes']} writes ({written['writes'] * CHUNK >> 20}"
          f" MiB), {written['syncs']} fsyncs, {read_bytes >> 20} MiB read, {runs} blkcache "
          f"runs {dict(sorted(codes.items()))}, up to {max(dirty_seen, default=0)} dirty "
          f"pages at a drop, {SIZE} bytes verified with O_DIRECT")
    assert written["writes"] > 0 and codes[("drop", 0)] + codes[("drop", 1)] > 10
    # The drops really raced with dirty data.
    assert max(dirty_seen, default=0) > 0
