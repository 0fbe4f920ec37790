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


@pytest.fixture
def mapped(loopdev):
    os.posix_fadvise(loopdev.fd, 0, 0, os.POSIX_FADV_RANDOM)
    kernel.read_buffered(loopdev.fd, 0, MiB)                 # bucket 0: all of it
    kernel.read_buffered(loopdev.fd, 10 * MiB + 5 * PAGE, PAGE)   # bucket 10: one page
    return loopdev


@pytest.mark.parametrize("interface", ["cachestat", "mincore"])
def test_map_buckets_match_the_kernel(mapped, interface):
    with api.Target(mapped) as target:
        rmap = residency_map(target, interface=interface)
    assert rmap.bucket_pages == (MiB // PAGE,) * 64
    assert list(rmap.cached) == [kernel.cached_pages(mapped, i * MiB, MiB) for i in range(64)]
    assert rmap.cached[0] == 256 and rmap.cached[10] == 1 and sum(rmap.cached) == 257
    assert rmap.render() == EXPECTED


def test_status_map_cli(mapped):
    out = cliproc.completed("status", "--map", "-n", mapped)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == f"{mapped}: {EXPECTED} 64M, 1M per column"
    out = cliproc.completed("status", "--map", "--json", mapped)
    (record,) = json.loads(out.stdout)["devices"]
    assert record["map"]["map"] == EXPECTED and record["map"]["cached"][10] == 1
    # A range of 16 pages: one column per page.
    out = cliproc.completed("status", "--map", "-n", "-o", str(MiB - 8 * PAGE),
                            "-l", str(16 * PAGE), mapped)
    assert out.stdout.splitlines()[1] == f"{mapped}: [{'O' * 8}{' ' * 8}] 64K, 4K per column"
