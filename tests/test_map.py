"""status --map: a fixed-width residency map from per-bucket queries."""

import json
import os

import pytest

from blkcache import api
from blkcache.resmap import residency_map

import cliproc
import kernel
from units import PAGE, MiB

EXPECTED = "[O" + " " * 9 + "o" + " " * 53 + "]"


# Pages per 1 MiB bucket, as the test reads them.
BUCKETS = [MiB // PAGE] + [0] * 9 + [1] + [0] * 53


def fill(loopdev):
    kernel.fill(loopdev.fd, 0, MiB)                          # bucket 0: all of it
    kernel.fill(loopdev.fd, 10 * MiB + 5 * PAGE, PAGE)       # bucket 10: one page


@pytest.fixture
def mapped(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    fill(loopdev)
    return loopdev


def exactly(mapped, measure):
    """measure() from a run during which the kernel kept every page read (the
    stressor or reclaim took one: read them again and rerun)."""
    return kernel.steady(mapped.fd, sum(BUCKETS), lambda: fill(mapped), measure)


@pytest.mark.parametrize("interface", ["cachestat", "mincore"])
def test_map_buckets_match_the_kernel(mapped, interface):
    def measure():
        with api.Target(mapped) as target:
            return residency_map(target, interface=interface)
    rmap = exactly(mapped, measure)
    assert rmap.bucket_pages == (MiB // PAGE,) * 64
    assert list(rmap.cached) == BUCKETS
    assert rmap.render() == EXPECTED


def status_map(*args):
    code, out, err = cliproc.run("status", "--map", *args)
    assert (code, err) == (0, "")
    return out


def test_status_map_cli(mapped):
    out = exactly(mapped, lambda: status_map("-n", mapped))
    assert out.splitlines()[1] == f"{mapped}: {EXPECTED} 64M, 1M per column"
    out = exactly(mapped, lambda: status_map("--json", mapped))
    (record,) = json.loads(out)["devices"]
    assert record["map"]["map"] == EXPECTED and record["map"]["cached"] == BUCKETS
    # A range of 16 pages: one column per page.
    out = exactly(mapped, lambda: status_map("-n", "-o", str(MiB - 8 * PAGE),
                                             "-l", str(16 * PAGE), mapped))
    assert out.splitlines()[1] == f"{mapped}: [{'O' * 8}{' ' * 8}] 64K, 4K per column"
