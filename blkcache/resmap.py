"""Where in a device the cached pages are: a fixed-width residency map.

The range is cut into ``width`` buckets; each bucket's cached pages come from
one status query on that bucket (cachestat(2), cheap; or mincore(2) windows
where cachestat is missing), so memory stays bounded whatever the size.
Rendered like vmtouch -v: ' ' nothing cached, 'o' part, 'O' all, '?' unknown.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from .constants import PAGE_SIZE
from .ranges import Range

DEFAULT_WIDTH = 64


@dataclass(frozen=True)
class ResidencyMap:
    path: str
    offset: int
    length: int
    page_size: int
    bucket_pages: Tuple[int, ...]            # pages in each bucket
    cached: Tuple[Optional[int], ...]        # cached pages per bucket (None: unknown)

    def render(self):
        cells = []
        for total, cached in zip(self.bucket_pages, self.cached):
            if cached is None:
                cells.append("?")
            elif cached == 0:
                cells.append(" ")
            elif cached >= total:
                cells.append("O")
            else:
                cells.append("o")
        return "[" + "".join(cells) + "]"

    def to_dict(self):
        return {"offset": self.offset, "length": self.length,
                "bucket_pages": list(self.bucket_pages), "cached": list(self.cached),
                "map": self.render()}


def residency_map(target, offset=0, length=None, width=DEFAULT_WIDTH,
                  interface="auto", progress=None, rng=None):
    """ResidencyMap of an open api.Target; progress(done, total) per bucket."""
    if rng is None:
        rng = target.range(offset, length)
    pages = rng.pages
    width = max(1, min(width, pages)) if pages else 1
    bounds = [rng.offset + (pages * i // width) * PAGE_SIZE for i in range(width + 1)]
    sizes, cached = [], []
    for i in range(width):
        start, end = bounds[i], bounds[i + 1]
        sizes.append((end - start) // PAGE_SIZE)
        if end <= start:
            cached.append(0)
        else:
            cached.append(target.status(rng=Range(start, end - start),
                                        interface=interface).cached)
        if progress is not None:
            progress(end - rng.offset, rng.length)
    return ResidencyMap(target.path, rng.offset, rng.length, PAGE_SIZE,
                        tuple(sizes), tuple(cached))
