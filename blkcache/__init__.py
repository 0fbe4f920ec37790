"""blkcache: drop and verify the page cache of block devices.

    >>> import blkcache
    >>> blkcache.status("/dev/loop0").cached
    >>> blkcache.drop("/dev/loop0").complete

The API lives in blkcache.api and is imported on first use, so that
``import blkcache`` (and the command line's start-up) stays cheap.
"""

from ._version import __version__

_API = ("status", "drop", "verify", "Target", "CacheState", "DropResult",
        "Verification", "PAGE_SIZE")
_ERRORS = ("BlkcacheError", "UnsupportedFileError", "InvalidRangeError", "UsageError",
           "MethodUnavailableError", "DirtyPagesError", "CannotTellError",
           "WritebackError", "WritebackFailedBefore", "HelperError",
           "MissingDependencyError", "StateDirError", "BusyError")

__all__ = ["__version__", *_API, *_ERRORS]


def __getattr__(name):
    if name in _API:
        from . import api as module
    elif name in _ERRORS:
        from . import errors as module
    else:
        raise AttributeError(f"module 'blkcache' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value     # later lookups skip this function
    return value
