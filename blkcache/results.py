"""What the API returns: the page-cache state of a range, a drop's result, a
verification.  Frozen dataclasses (blkcache.record: their methods written
out, not generated at import); to_dict() gives their JSON form."""

from dataclasses import asdict
from typing import Optional

from .record import Record, record


@record
class CacheState(Record):
    """Page-cache state of a byte range of a device or file.

    ``cached``, ``dirty``, ``writeback``, ``evicted`` and ``recently_evicted``
    are page counts, or None when the kernel did not tell (``exact`` False:
    see ``reason``; mincore(2) never tells dirty or writeback counts).
    """

    path: str
    device: str
    kind: str               # "block" or "file"
    size: int               # bytes
    page_size: int
    offset: int             # page aligned start of the range
    length: int             # bytes, whole pages (the last may pass the end;
                            # short only where 2^63-1 bytes cuts the last page)
    pages: int              # pages in the range
    cached: Optional[int]
    dirty: Optional[int]
    writeback: Optional[int]
    evicted: Optional[int]
    recently_evicted: Optional[int]
    interface: str          # "cachestat", "mincore" or "none" (empty range)
    exact: bool
    reason: Optional[str] = None
    #: Pages cached past the end of the device (included in the counts above):
    #: a block device that shrank keeps them, and shows them again if it grows.
    #: None where mincore(2) answered, which cannot see past the end.
    beyond_end: Optional[int] = 0

    def __init__(self, path, device, kind, size, page_size, offset, length, pages, cached,
                 dirty, writeback, evicted, recently_evicted, interface, exact, reason=None,
                 beyond_end=0):
        self.__dict__.update(
            path=path, device=device, kind=kind, size=size, page_size=page_size,
            offset=offset, length=length, pages=pages, cached=cached, dirty=dirty,
            writeback=writeback, evicted=evicted, recently_evicted=recently_evicted,
            interface=interface, exact=exact, reason=reason, beyond_end=beyond_end)

    @property
    def cached_bytes(self):
        return None if self.cached is None else self.cached * self.page_size

    @property
    def clean(self):
        """True: no page cached; False: some are; None: cannot tell."""
        return None if self.cached is None else self.cached == 0

    def to_dict(self):
        data = asdict(self)
        data["cached_bytes"] = self.cached_bytes
        return data


@record
class DropResult(Record):
    """What drop() did: the method used, the states before and after."""

    path: str
    device: str
    method: str             # "ioctl", "helper" or "fadvise"
    attempts: int
    before: CacheState
    after: CacheState
    #: Set when auto had to fall back to posix_fadvise on a whole block device.
    warning: Optional[str] = None

    def __init__(self, path, device, method, attempts, before, after, warning=None):
        self.__dict__.update(path=path, device=device, method=method, attempts=attempts,
                             before=before, after=after, warning=warning)

    @property
    def remaining(self):
        """Pages still cached after the drop, None when unknown."""
        return self.after.cached

    @property
    def dropped(self):
        if self.before.cached is None or self.after.cached is None:
            return None
        return max(0, self.before.cached - self.after.cached)

    @property
    def complete(self):
        """True when the range is known to hold no cached page."""
        return self.after.clean is True

    def to_dict(self):
        return {"path": self.path, "device": self.device, "method": self.method,
                "attempts": self.attempts, "dropped": self.dropped,
                "remaining": self.remaining, "complete": self.complete,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "warning": self.warning}


@record
class Verification(Record):
    """verify(): "clean", "resident" or "unknown", with the state behind it."""

    verdict: str
    state: CacheState

    def __init__(self, verdict, state):
        self.__dict__.update(verdict=verdict, state=state)

    def to_dict(self):
        return {"verdict": self.verdict, **self.state.to_dict()}


@record
class StatusReport(Record):
    """status with its extras: the CacheState, and when asked for, who holds
    the device (blkcache.holders.Holders) and where its pages are cached
    (blkcache.resmap.ResidencyMap)."""

    state: CacheState
    holders: Optional[object] = None
    map: Optional[object] = None

    def __init__(self, state, holders=None, map=None):
        self.__dict__.update(state=state, holders=holders, map=map)

    def to_dict(self):
        data = self.state.to_dict()
        if self.holders is not None:
            data["holders"] = self.holders.to_dict()
        if self.map is not None:
            data["map"] = self.map.to_dict()
        return data
