"""blkcache.watch with an injected clock and sleep, on a regular file of our
own (any user may ask the kernel about the page cache of a file it owns).

The injected sleep is where time passes and where the cache changes, so the
stop conditions and the one-line-per-change rule are checked exactly."""

import os

import pytest

from blkcache.api import Target
from blkcache.watch import watch

from units import PAGE


class Clock:
    """A monotonic clock that moves only when the watch sleeps; each sleep
    first runs the next of ``changes`` (a callable, or None)."""

    def __init__(self, changes=()):
        self.now = 100.0
        self.slept = []
        self.changes = list(changes)

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert len(self.slept) < 100, "the watch did not stop"
        self.slept.append(seconds)
        self.now += seconds
        change = self.changes.pop(0) if self.changes else None
        if change is not None:
            change()


@pytest.fixture
def image(tmp_path):
    """A 16-page file of ours, written and flushed, then dropped from the cache;
    yields (path, fd)."""
    path = tmp_path / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(fd, b"x" * 16 * PAGE)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        yield str(path), fd
    finally:
        os.close(fd)


def _read(fd, pages):
    return lambda: os.pread(fd, pages * PAGE, 0)


def _drop(fd):
    return lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def run(path, clock, **kwargs):
    with Target(path) as target:
        return list(watch(target, clock=clock, sleep=clock.sleep, **kwargs))


def test_count_counts_samples_and_only_changes_are_yielded(image):
    path, fd = image
    # Samples: 0 cached; (read 2 pages) >0; (nothing) same; (drop) 0; stop at 4.
    clock = Clock([_read(fd, 2), None, _drop(fd)])
    samples = run(path, clock, interval=0.5, count=4)
    assert [s.sample for s in samples] == [1, 2, 4]
    assert [s.elapsed for s in samples] == [0.0, 0.5, 1.5]
    assert samples[0].state.cached == 0 and samples[2].state.cached == 0
    assert samples[1].state.cached > 0
    assert clock.slept == [0.5, 0.5, 0.5]          # no sleep after the last sample


def test_timeout_stops_when_the_next_sample_would_pass_it(image):
    path, _ = image
    clock = Clock()
    samples = run(path, clock, interval=0.25, timeout=1.0)
    assert [s.sample for s in samples] == [1]      # nothing changed: one line
    # Samples at 0, 0.25, 0.5, 0.75 and 1.0; the next (1.25) would pass the timeout.
    assert clock.slept == [0.25] * 4


def test_until_empty(image):
    path, fd = image
    _read(fd, 4)()
    clock = Clock([None, _drop(fd)])
    samples = run(path, clock, interval=1, until_empty=True)
    assert [s.sample for s in samples] == [1, 3]
    assert samples[0].state.cached > 0 and samples[-1].state.cached == 0
    assert clock.slept == [1, 1]


def test_a_bad_interval_is_refused(image):
    path, _ = image
    with pytest.raises(ValueError):
        run(path, Clock(), interval=0)
