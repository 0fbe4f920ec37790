"""Byte ranges of a target: validated, then widened to whole pages."""

from .constants import MAX_SIZE, PAGE_SIZE
from .errors import InvalidRangeError
from .sizes import page_ceil, parse_size


class Range:
    """A validated, page-aligned byte range of a target (a plain class, since
    each dataclass costs start-up time)."""

    __slots__ = ("offset", "length")

    def __init__(self, offset, length):
        self.offset = offset
        self.length = length

    def __eq__(self, other):
        return isinstance(other, Range) and (self.offset, self.length) == \
            (other.offset, other.length)

    def __repr__(self):
        return f"Range(offset={self.offset}, length={self.length})"

    @property
    def pages(self):
        return -(-self.length // PAGE_SIZE)

    def whole(self, size):
        """Whether the range covers all ``size`` bytes of its target."""
        return self.offset == 0 and self.offset + self.length >= size

    def to_end(self, size):
        """Whether the range reaches the end of a target of ``size`` bytes (and
        so takes in the pages cached past it: a block device that shrank keeps
        those)."""
        return self.offset + self.length >= size


def page_range(size, offset=0, length=None, path=None):
    """The Range of a target of ``size`` bytes for ``offset``/``length`` (ints
    or size strings; length None: to the end), widened to whole pages.

    Raises InvalidRangeError (about ``path``) for an empty range or one that
    passes the end, UsageError for a bad size.
    """
    if type(offset) is int and offset == 0 and length is None:
        # The whole target (the common case, without parsing).
        return Range(0, min(page_ceil(size), MAX_SIZE))
    offset = parse_size(offset, "offset")
    if length is not None:
        length = parse_size(length, "length")
        if length == 0:
            raise InvalidRangeError("length must be greater than zero", path)
    if offset and offset >= size:
        raise InvalidRangeError(
            f"offset {offset} is beyond the end of the device ({size} bytes)", path)
    if length is None:
        length = size - offset
    elif length > size - offset:
        raise InvalidRangeError(
            f"range {offset}+{length} ends beyond the end of the device "
            f"({size} bytes)", path)
    start = offset // PAGE_SIZE * PAGE_SIZE
    # Rounded up to a page, but never past 2^63-1, which off_t cannot pass (a
    # device within a page of 8 EiB).
    end = min(page_ceil(offset + length), MAX_SIZE)
    return Range(start, end - start)
