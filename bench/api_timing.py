"""blkcache.status() / blkcache.drop() timed in a fresh process: the twin of timing.c.

usage: api_timing.py status|drop DEV N [START]: prints N lines "seconds cached_after",
each call timed after the import, the wait for START (a CLOCK_MONOTONIC time)
and an untimed warm-up call (a status), like the C.
"""

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
