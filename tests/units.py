"""Sizes the tests share (one place, instead of a copy per module)."""

import os

PAGE = os.sysconf("SC_PAGE_SIZE")
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
