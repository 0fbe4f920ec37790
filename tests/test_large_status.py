"""status on a 1 TiB sparse device with 256 MiB cached: right answer, bounded memory."""

import os
import sys

import pytest

import kernel
from units import PAGE, MiB, TiB


@pytest.mark.parametrize("interface", ["cachestat", "mincore"])
def test_one_tib_status_under_40_mib(loops, interface):
    dev = loops.attach(size=TiB)
    fd = loops.hold(dev)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    # 256 MiB cached, spread over the device: 64 chunks of 4 MiB.
    for i in range(64):
        kernel.fill(fd, i * (TiB // 64), 4 * MiB)

    def status():
        return kernel.peak_rss([sys.executable, "-m", "blkcache", "status", "-b", "-n",
                                "--interface", interface, dev])
    before, (code, out, err, rss), after = kernel.around(fd, status)
    assert before > 0.9 * 256 * MiB // PAGE, "the test needs 256 MiB cached"
    assert (code, err) == (0, "")
    res, pages, size = out.split()[:3]
    kernel.between(before, int(pages), after)
    assert (int(res), int(size)) == (int(pages) * PAGE, TiB)
    assert rss < 40 * MiB, f"peak RSS {rss / MiB:.1f} MiB"
