"""Drop the page cache of a range of an open target: choose the method, write
back, drop, verify, retry."""

import time
from typing import NamedTuple, Optional

from . import caps, failures, native
from .constants import DEFAULT_RETRIES, METHODS
from .errors import (
    CannotTellError,
    DirtyPagesError,
    MethodUnavailableError,
    StateDirError,
    WritebackError,
    WritebackFailedBefore,
)
from .failures import Failure
from .results import CacheState, DropResult

_FIRST_DELAY = 0.01


class Checked(NamedTuple):
    """What check() found: nothing stops a drop of the range."""

    method: str                 # "ioctl", "helper" or "fadvise"
    warning: Optional[str]      # auto fell back to posix_fadvise on a whole device, or
                                # (discard_failed) the state directory is not trusted
    before: CacheState
    failure: Optional[Failure]  # a failed write-back on record (discard_failed given)


def check(target, rng, method="auto", expect_clean=False, interface="auto",
          discard_failed=False):
    """Everything drop() checks before it writes back or drops anything: a
    failed write-back on record (WritebackFailedBefore), the method
    (MethodUnavailableError) and, with ``expect_clean``, dirty pages
    (DirtyPagesError, CannotTellError).  A Checked; nothing changes.

    A caller with several devices checks them all before dropping any
    (blkcache.integrations.ansible); drop() checks again, under the lock."""
    failure, record_warning = _failure_on_record(target, discard_failed)
    method, warning = choose_method(target, method, rng)
    before = target.status(rng=rng, interface=interface)
    if expect_clean:
        _refuse_dirty(target, before)
    return Checked(method, _join(warning, record_warning), before, failure)


def _join(*warnings):
    return "; ".join(w for w in warnings if w) or None


def _failure_on_record(target, discard_failed):
    """(Failure or None, warning or None); WritebackFailedBefore or
    StateDirError when the drop must not go on."""
    try:
        failure = failures.lookup(target.fd)
    except StateDirError as exc:
        if not discard_failed:
            raise StateDirError(
                f"{exc.message}; cannot tell whether a failed write-back of "
                f"{target.path} is on record, so nothing was dropped", exc.path,
                exc.fix) from None
        return None, f"{exc.path}: {exc.message}: no record consulted or removed"
    if failure is not None and not discard_failed:
        raise WritebackFailedBefore(
            f"{failure.describe()}: its cached pages may be the only copy of that "
            "data; nothing was dropped (save what is needed, then drop with "
            "--discard-failed)", target.path, failure)
    return failure, None


def _forget(target, failure):
    """Remove the record a completed --discard-failed drop made obsolete; a
    warning if it cannot be removed (the drop itself succeeded)."""
    try:
        failures.clear(target.fd)
    except StateDirError as exc:
        reason = f"{exc.path}: {exc.message}"
    except OSError as exc:
        reason = f"{exc.filename}: {exc.strerror or exc}"
    else:
        return None
    return (f"the record {failure.record} could not be removed ({reason}); "
            "later drops refuse until it is (blkcache failures --clear)")


def drop(target, rng, method="auto", expect_clean=False, retries=DEFAULT_RETRIES,
         interface="auto", discard_failed=False):
    """DropResult of dropping ``rng`` of ``target``; see Target.drop.

    The device's drop lock (failures.lock) is held from the look-up of a
    failure on record to the end, so that the failure a concurrent drop's
    sync was told of is on record before this one looks.
    """
    failures.lock(target.fd, target.path)
    try:
        return _drop_locked(target, rng, method, expect_clean, retries, interface,
                            discard_failed)
    finally:
        failures.unlock(target.fd)


def _drop_locked(target, rng, method, expect_clean, retries, interface, discard_failed):
    method, warning, before, failure = check(target, rng, method, expect_clean, interface,
                                             discard_failed)
    attempts = 0
    delay = _FIRST_DELAY
    while True:
        attempts += 1
        _sync(target, rng, before, interface)
        _drop_once(target, method, rng)
        after = target.status(rng=rng, interface=interface)
        if after.clean is not False or attempts > retries:
            break
        time.sleep(delay)
        delay *= 2
    if failure is not None:
        warning = _join(warning, _forget(target, failure))
    return DropResult(target.path, target.device, method, attempts, before, after, warning)


def choose_method(target, method, rng):
    """(method to use, warning or None) for dropping ``rng`` of ``target``
    with ``method``; "auto" picks ioctl, helper, fadvise (privilege.auto_method).

    The warning is set when auto falls back to posix_fadvise on a whole block
    device; the helper is probed once for both answers.  A method that cannot
    work raises MethodUnavailableError, with the fix.  blkcache.privilege is
    imported only when the helper or a fix is involved: it costs a fresh
    process about 3 ms (its dataclasses; measured here), as much as BLKFLSBUF
    of a cached GiB.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    if method == "fadvise":
        return method, None
    whole = target.kind == "block" and rng.whole(target.size)
    if method == "auto":
        if not whole:
            return "fadvise", None
        if caps.has_sys_admin():
            return "ioctl", None            # what privilege.auto_method() says first
        from . import privilege

        choice = privilege.auto_method()
        if choice.method == "fadvise":
            return choice.method, privilege.fallback_warning(choice)
        return choice.method, None
    if target.kind != "block":
        raise MethodUnavailableError("BLKFLSBUF works on block devices only", target.path,
                                     fix="use --method fadvise")
    if not whole:
        raise MethodUnavailableError("BLKFLSBUF drops the whole device, not a range",
                                     target.path, fix="drop a range with --method fadvise")
    if method == "helper":
        from . import privilege

        privilege.require_helper(target.path)
    elif not caps.has_sys_admin():
        from . import privilege

        raise MethodUnavailableError("BLKFLSBUF needs CAP_SYS_ADMIN, which this process lacks",
                                     target.path, fix=privilege.ioctl_fix())
    return method, None


def _refuse_dirty(target, before):
    """expect_clean: raise unless ``before`` knows the range holds no dirty page."""
    if before.dirty is None or before.writeback is None:
        raise CannotTellError(
            "cannot tell whether pages are dirty "
            f"({before.reason or 'mincore(2) does not report dirty pages'}); "
            "nothing was flushed or dropped", target.path, before)
    if before.dirty or before.writeback:
        raise DirtyPagesError(
            f"{before.dirty} dirty and {before.writeback} writeback "
            "pages on a device expected clean; nothing was flushed or dropped",
            target.path, before)


def _sync(target, rng, before, interface):
    try:
        native.datasync(target.fd)
    except OSError as exc:
        err = exc.errno
    else:
        return
    # The kernel tells each open file once and marks the pages clean: record
    # it at once (the drop lock keeps every other drop of this device
    # waiting), or the next drop would discard the only copy.
    try:
        record, problem = failures.record(target.fd, target.path, err, before.dirty), None
    except StateDirError as exc:
        record, problem = None, f"{exc.path}: {exc.message}; fix: {exc.fix}"
    except OSError as exc:
        record, problem = None, f"{exc.strerror or exc}: {exc.filename}"
    after = target.status(rng=rng, interface=interface)
    raise WritebackError(err, target.path, before, after, record, problem)


def _drop_once(target, method, rng):
    if method == "helper":
        from .privilege import run_helper

        run_helper(target.fd, target.path)
    elif method == "ioctl":
        native.flush_buffers(target.fd, target.path)
    else:
        # Length 0 is "to the end of the cache": pages past the end of a device
        # that shrank go too.
        length = 0 if rng.to_end(target.size) else rng.length
        native.drop_range(target.fd, rng.offset, length, target.path)
