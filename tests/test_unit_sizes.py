"""blkcache.sizes: parsing and printing sizes the util-linux way.  Pure: any user."""

import pytest

from blkcache.errors import UsageError
from blkcache.sizes import MAX_SIZE, format_size, page_ceil, parse_size

from units import PAGE, GiB, KiB, MiB, TiB


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4096", 4096), (4096, 4096), ("512B", 512), ("4K", 4 * KiB), ("4k", 4 * KiB),
    ("4KiB", 4 * KiB), ("4KB", 4000), ("1.5M", 3 * MiB // 2), ("1.5MB", 1500000),
    ("2G", 2 * GiB), ("1T", TiB), (" 7 M ", 7 * MiB), ("0" * 300 + "1K", KiB),
    ("1.50K", 1536), ("7E", 7 << 60),
    (str(MAX_SIZE), MAX_SIZE),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,reason", [
    ("-1", "invalid offset: '-1'"), ("", "invalid offset: ''"), ("12XB", "invalid offset"),
    ("1.5", "fractions need a unit"), ("8E", "larger than 2^63-1 bytes"),
    (str(MAX_SIZE + 1), "larger than 2^63-1 bytes"), ("1" * 20, "larger than 2^63-1 bytes"),
    ("1." + "1" * 65 + "K", "too many decimals"), (-5, "negative"), ("K", "invalid offset"),
])
def test_parse_size_refuses(text, reason):
    with pytest.raises(UsageError) as info:
        parse_size(text, "offset")
    assert reason in str(info.value)


@pytest.mark.parametrize("value,text", [
    (0, "0B"), (512, "512B"), (1023, "1023B"), (KiB, "1K"), (1536, "1.5K"), (4 * KiB, "4K"),
    (256 * MiB, "256M"), (MiB - 1, "1M"), (GiB + GiB // 10, "1.1G"), (TiB, "1T"),
])
def test_format_size(value, text):
    assert format_size(value) == text


def test_page_ceil():
    assert [page_ceil(n) for n in (0, 1, PAGE - 1, PAGE, PAGE + 1)] == \
        [0, PAGE, PAGE, PAGE, 2 * PAGE]
    assert page_ceil(513, 512) == 1024
