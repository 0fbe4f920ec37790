"""Watch the page cache of a device change (a migration window, a drop).

watch() is a generator: it samples the device every ``interval`` seconds and
yields a Sample whenever the cached, dirty or writeback count changes (the
first sample always).  It stops after ``count`` samples, when nothing is
cached any more (``until_empty``), after ``timeout`` seconds, or when the
kernel will not tell (an unknown sample is yielded, then it stops).
The caller stops it early by closing it (or on a signal).
"""

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    time: float          # wall clock (epoch seconds)
    elapsed: float       # seconds since the watch started
    sample: int          # sample number, from 1
    state: object        # api.CacheState

    @property
    def key(self):
        return (self.state.cached, self.state.dirty, self.state.writeback)

    def to_dict(self):
        s = self.state
        return {"time": round(self.time, 3), "elapsed": round(self.elapsed, 3),
                "sample": self.sample, "path": s.path, "cached": s.cached,
                "cached_bytes": s.cached_bytes, "dirty": s.dirty,
                "writeback": s.writeback, "interface": s.interface, "exact": s.exact}


def watch(target, interval=0.5, count=None, until_empty=False, timeout=None,
          offset=0, length=None, interface="auto", clock=time.monotonic,
          sleep=time.sleep):
    """Yield a Sample of ``target`` (an open api.Target) at each change."""
    if interval <= 0:
        raise ValueError("interval must be positive")
    rng = target.range(offset, length)
    started = clock()
    last = None
    n = 0
    while True:
        n += 1
        state = target.status(rng=rng, interface=interface)
        now = clock()
        sample = Sample(time.time(), now - started, n, state)
        final = (not state.exact
                 or (count is not None and n >= count)
                 or (until_empty and state.cached == 0)
                 or (timeout is not None and now - started + interval > timeout))
        if sample.key != last:
            yield sample
            last = sample.key
        if final:
            return
        sleep(interval)
