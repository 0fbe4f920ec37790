"""Exit codes of the blkcache command, computed here and nowhere else.

  0   success; verify: the range is known to hold no cached page;
      verify --coherence: every clean cached page matches the device
  1   pages remain cached (verify found some; drop could not drop them all);
      verify --coherence: stale pages (cached bytes differ from the device);
      watch --until-empty: pages still cached when it stopped
  2   usage error or bad input: unknown option, bad size or range, missing
      path, not a block device or regular file, too many devices
  3   unknown: the kernel will not tell this user (cachestat EPERM,
      restricted mincore); never reported as clean
  4   drop --expect-clean refused: dirty or writeback pages; nothing done;
      verify --coherence: no stale page, but dirty or writeback pages that
      could not be compared
  5   failure: permission denied, I/O error, failed write-back (nothing
      dropped; also while an earlier one is on record, see
      blkcache.failures; or the record's directory is not trusted),
      drop method unavailable, device gone, output not delivered
  32  several devices given and every one failed (5)
  64  several devices given and some failed (5)
"""

from .errors import (
    BlkcacheError,
    BusyError,
    CannotTellError,
    DirtyPagesError,
    NOT_FOUND_ERRNOS,
    MethodUnavailableError,
    StateDirError,
    WritebackFailedBefore,
)

OK = 0
RESIDENT = 1
USAGE = 2
UNKNOWN = 3
DIRTY = 4
FAILURE = 5
ALL_FAILED = 32
SOME_FAILED = 64
INTERRUPTED = 130

# When several devices give different answers, the worse one wins (bad input
# on one device, found only once it was reached, ranks above every verdict).
_SEVERITY = (OK, RESIDENT, UNKNOWN, DIRTY, USAGE, FAILURE)


def for_state(state):
    """status: 0 when the kernel answered, 3 when it would not."""
    return OK if state.exact else UNKNOWN


def for_verdict(verdict):
    return {"clean": OK, "resident": RESIDENT, "unknown": UNKNOWN}[verdict]


def for_drop(result):
    return for_verdict({True: "clean", False: "resident", None: "unknown"}[result.after.clean])


def for_error(exc):
    """The code for an exception raised by the API."""
    if isinstance(exc, DirtyPagesError):
        return DIRTY
    if isinstance(exc, CannotTellError):
        return UNKNOWN
    if isinstance(exc, (MethodUnavailableError, WritebackFailedBefore, StateDirError,
                        BusyError)):
        return FAILURE
    if isinstance(exc, BlkcacheError):
        return USAGE
    if isinstance(exc, OSError) and exc.errno in NOT_FOUND_ERRNOS:
        return USAGE
    return FAILURE


def combine(codes):
    """One exit code for several devices (fstrim's 32/64 for failures)."""
    codes = list(codes)
    if not codes:
        return OK
    if len(codes) == 1:
        return codes[0]
    failed = sum(1 for code in codes if code == FAILURE)
    if failed == len(codes):
        return ALL_FAILED
    if failed:
        return SOME_FAILED
    return max(codes, key=_rank)


def _rank(code):
    return _SEVERITY.index(code) if code in _SEVERITY else len(_SEVERITY)


def for_coherence(report):
    """verify --coherence: 0 coherent, 1 stale, 4 dirty (not compared), 3 unknown."""
    return {"coherent": OK, "stale": RESIDENT, "dirty": DIRTY,
            "unknown": UNKNOWN}[report.verdict]


def for_watch(last, until_empty=False):
    """watch: 3 when the kernel would not tell; with --until-empty, 1 if pages remain."""
    if last is None:
        return OK
    if not last.state.exact:
        return UNKNOWN
    if until_empty and last.state.cached:
        return RESIDENT
    return OK


def for_output_error(code, exc):
    """The code when writing the output failed with ``exc``: a reader that went
    away (EPIPE, as with `| head`) keeps the result; any other write error
    (a full disk...) lost what was asked for: failure."""
    if isinstance(exc, BrokenPipeError):
        return code
    return code if code in (FAILURE, ALL_FAILED, SOME_FAILED) else FAILURE
