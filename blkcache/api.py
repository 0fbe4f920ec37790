"""The blkcache Python API: status, drop and verify a device's page cache.

Everything the command line does is here; the CLI only renders results.
Each public function opens the path once (read-only, non-blocking, close on
exec, no controlling tty), checks its type with fstat on that fd, and works
on the fd alone (blkcache.target.Target).  run() does what the command line
does with several devices: the same expansion, checks and exit codes.
"""

import contextlib
from typing import Any, List, Optional

from . import exitcodes
from .constants import DEFAULT_RETRIES, MAX_TARGETS, PAGE_SIZE
from .errors import BlkcacheError, MissingNodeError, UsageError
from .ranges import Range
from .record import MutableRecord, Record, record
from .residency import UNKNOWN_REASON
from .results import CacheState, DropResult, StatusReport, Verification
from .sizes import format_size, parse_size
from .target import Target


def open_targets(paths, stack, offset=0, length=None):
    """Open every path (at most MAX_TARGETS) into ``stack``, an ExitStack.

    All are opened and type-checked, and the range (``offset``, ``length``)
    is validated on each, before any is used: bad input on any device (a
    path, a type, a range past its end) stops a multi-device call before
    anything changes.
    """
    paths = list(paths)
    if len(paths) > MAX_TARGETS:
        raise UsageError(f"too many devices: {len(paths)} (at most {MAX_TARGETS})")
    targets = [stack.enter_context(Target(path)) for path in paths]
    for target in targets:
        target.range(offset, length)
    return targets


@record
class Outcome(Record):
    """What run() got for one device: a ``result``, or the ``error`` (an
    OSError or BlkcacheError) that stopped it; ``code`` is its exit code.
    With ``recursive``, ``relation`` is how the device relates to one named
    (a blkcache.stack.Related), else None."""

    path: Optional[str]
    result: Any
    error: Optional[Exception]
    code: int
    relation: Any = None

    def __init__(self, path, result, error, code, relation=None):
        self.__dict__.update(path=path, result=result, error=error, code=code,
                             relation=relation)


@record
class Batch(MutableRecord):
    """What run() did: an Outcome per device, in order, and the exit code of
    the whole (blkcache.exitcodes.combine: 32 all failed, 64 some failed).
    Without ``recursive``, ``not_checked`` lists the related devices of those
    named that were left out (blkcache.stack.Related: partitions, disk,
    slaves, holders)."""

    outcomes: List[Outcome]
    code: int = exitcodes.OK
    not_checked: List[Any] = None

    def __init__(self, outcomes=None, code=exitcodes.OK, not_checked=None):
        self.__dict__.update(outcomes=[] if outcomes is None else outcomes, code=code,
                             not_checked=[] if not_checked is None else not_checked)

    @property
    def results(self):
        return [o.result for o in self.outcomes if o.error is None]


def expand(paths, sysfs=None):
    """Each path, then its partitions, the devices below and the devices
    above it (blkcache.stack): a list of device paths, or MissingNodeError
    for one without a node in /dev."""
    return [item if isinstance(item, MissingNodeError) else item.path
            for item in _related(paths, sysfs)]


def _related(paths, sysfs=None):
    """expand(), with a blkcache.stack.Related for each device found."""
    from . import stack

    return [MissingNodeError(rel) if rel.missing else rel
            for rel in stack.expand_all(paths, sysfs)]


def run(paths, action, recursive=False, report=None, code_of=exitcodes.for_result,
        offset=0, length=None):
    """Run ``action(target)`` on every device of ``paths``; a Batch.

    With ``recursive``, each path is expanded first (see expand()).  Every
    device is opened and type-checked, and the range (``offset``,
    ``length``) validated on it, before ``action`` runs on any: bad input (a
    path, a file type, too many devices, a range past the end of any one)
    stops the call before anything is done, with that one error as the
    outcome.  Otherwise an error of one device is its outcome, and the others
    go on.  ``code_of`` maps a result to its exit code; ``report(outcome)``,
    if given, is called as each outcome is known.
    """
    batch = Batch()

    def done(path, result, error, code, relation=None):
        outcome = Outcome(path, result, error, code, relation)
        batch.outcomes.append(outcome)
        if report is not None:
            report(outcome)

    codes = []
    relations = {}
    if recursive:
        for item in _related(paths):
            if isinstance(item, MissingNodeError):
                done(None, None, item, exitcodes.FAILURE, item.related)
                codes.append(exitcodes.FAILURE)
            else:
                relations[item.path] = item
        paths = list(relations)
    with contextlib.ExitStack() as stack:
        try:
            targets = open_targets(paths, stack, offset, length)
        except (OSError, BlkcacheError) as exc:
            batch.code = exitcodes.for_error(exc)
            done(getattr(exc, "filename", None) or getattr(exc, "path", None), None, exc,
                 batch.code)
            return batch
        if not recursive:
            from .stack import unchecked

            batch.not_checked = unchecked(paths)
        for target in targets:
            relation = relations.get(target.path)
            try:
                result = action(target)
            except (OSError, BlkcacheError) as exc:
                done(target.path, None, exc, exitcodes.for_error(exc), relation)
            else:
                done(target.path, result, None, code_of(result), relation)
            codes.append(batch.outcomes[-1].code)
    batch.code = exitcodes.combine(codes)
    return batch


def status_report(target, offset=0, length=None, interface="auto", holders=False,
                  residency_map=False, progress=None):
    """StatusReport of an open Target: its CacheState and, when asked for, its
    holders and residency map (``progress(done, total)`` follows the map)."""
    state = target.status(offset, length, interface)
    held = rmap = None
    if holders:
        from .holders import holders_of

        held = holders_of(target)
    if residency_map:
        from .resmap import residency_map as map_of

        rmap = map_of(target, rng=Range(state.offset, state.length), interface=interface,
                      progress=progress)
    return StatusReport(state, held, rmap)


def status(path, offset=0, length=None, interface="auto"):
    """CacheState of ``path`` (a block device or regular file)."""
    with Target(path) as target:
        return target.status(offset, length, interface)


def drop(path, offset=0, length=None, method="auto", expect_clean=False,
         retries=DEFAULT_RETRIES, interface="auto", discard_failed=False):
    """Sync, drop and verify the page cache of ``path``; see Target.drop."""
    with Target(path) as target:
        return target.drop(offset, length, method, expect_clean, retries, interface,
                           discard_failed)


def verify(path, offset=0, length=None, interface="auto"):
    """Verification of ``path``: clean, resident or unknown."""
    with Target(path) as target:
        return target.verify(offset, length, interface)


__all__ = ["CacheState", "DropResult", "Verification", "StatusReport", "Target", "Range",
           "Outcome", "Batch", "status", "drop", "verify", "status_report", "run", "expand",
           "open_targets",
           "MAX_TARGETS", "PAGE_SIZE", "UNKNOWN_REASON", "format_size", "parse_size"]
