"""Parse and print byte sizes the way util-linux does (K, M, G, KiB, MB...)."""

import re

from .constants import MAX_SIZE, PAGE_SIZE
from .errors import UsageError

_UNITS = "KMGTPEZY"
_SIZE_PATTERN = r"^\s*(\d+)(?:\.(\d+))?\s*(?:([KMGTPEZY])(iB|B)?|(B))?\s*$"
_size_re = None     # compiled on first use: not every run parses a size


def parse_size(text, what="size"):
    """Bytes for ``text``: a number with an optional suffix.

    K, M, G, T, P, E (and KiB, MiB...) are powers of 1024; KB, MB... are
    powers of 1000; B or no suffix means bytes.  Negative values, garbage and
    values above 2^63-1 raise UsageError.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        global _size_re
        if _size_re is None:
            _size_re = re.compile(_SIZE_PATTERN, re.IGNORECASE | re.ASCII)
        match = _size_re.match(str(text))
        if not match:
            raise UsageError(f"invalid {what}: {text!r}")
        whole, frac, unit, kind, _plain = match.groups()
        # Leading zeros of the number and trailing zeros of the fraction mean
        # nothing; past that, 2^63-1 has 19 digits.  (This also keeps int()
        # below its 4300-digit limit, which would raise ValueError.)
        whole = whole.lstrip("0") or "0"
        if frac is not None and not unit:
            raise UsageError(f"invalid {what}: {text!r} (fractions need a unit)")
        frac = (frac or "").rstrip("0")
        if len(whole) > 19:
            raise UsageError(f"invalid {what}: {text!r} (larger than 2^63-1 bytes)")
        if len(frac) > 64:
            raise UsageError(f"invalid {what}: {text!r} (too many decimals)")
        base = 1000 if kind and kind.upper() == "B" else 1024
        mult = base ** (_UNITS.index(unit.upper()) + 1) if unit else 1
        value = int(whole) * mult
        if frac:
            value += int(frac) * mult // 10 ** len(frac)
    if value < 0:
        raise UsageError(f"invalid {what}: {text!r} (negative)")
    if value > MAX_SIZE:
        raise UsageError(f"invalid {what}: {text!r} (larger than 2^63-1 bytes)")
    return value


def format_size(nbytes):
    """Human size like util-linux: 0B, 512B, 4K, 1.5M, 256M, 1T."""
    if nbytes < 1024:
        return f"{nbytes}B"
    exp = 0
    value = nbytes
    while value >= 1024 and exp < len(_UNITS):
        value /= 1024
        exp += 1
    # One decimal, dropped when it is zero (util-linux prints 1.5M and 2M).
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    if text == "1024" and exp < len(_UNITS):
        text, exp = "1", exp + 1
    return f"{text}{_UNITS[exp - 1]}"


def page_ceil(nbytes, unit=PAGE_SIZE):
    """``nbytes`` rounded up to a whole number of ``unit`` (a page)."""
    return -(-nbytes // unit) * unit
