"""Exit codes of the blkcache command, computed here and nowhere else.

TABLE is the one description of each code: ``blkcache --help`` prints it
(help_text()), and tests/test_exitcodes.py holds the EXIT STATUS section of
man/blkcache.8 and README.md to it.
"""

from .errors import (
    NOT_FOUND_ERRNOS,
    BlkcacheError,
    BusyError,
    CannotTellError,
    DirtyPagesError,
    MethodUnavailableError,
    MissingDependencyError,
    MissingNodeError,
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

#: Every documented exit code and what it means, in the lines --help prints.
TABLE = (
    (OK, ("success; verify: no page of the range is cached;",
          "verify --coherence: every clean cached page matches the device")),
    (RESIDENT, ("pages remain cached (verify found some, drop could not drop all);",
                "verify --coherence: stale pages;",
                "watch --until-empty: pages remain")),
    (USAGE, ("usage error or bad input (option, size, range, path, file type,",
             "too many devices); nothing changed")),
    (UNKNOWN, ('unknown: the kernel will not tell this user; never "clean"',)),
    (DIRTY, ("drop --expect-clean refused: dirty pages found, nothing done;",
             "verify --coherence: dirty pages not compared (and none stale)")),
    (FAILURE, ("failure: permission denied, I/O error, failed write-back (now or",
               "on record: see --discard-failed and blkcache failures), state",
               "directory not trusted, method unavailable, device gone, output",
               "not delivered (standard output full or closed); status --prometheus:",
               "prometheus_client missing")),
    (ALL_FAILED, ("several devices: all failed (5)",)),
    (SOME_FAILED, ("several devices: some failed (5)",)),
)


def meaning(code):
    """What exit code ``code`` means, on one line."""
    return " ".join(dict(TABLE)[code])


def help_text():
    """The "Exit status" block of --help (click keeps a block after \\b as is)."""
    lines = ["\b", "Exit status:"]
    for code, text in TABLE:
        lines.append(f"  {code:<4}{text[0]}")
        lines += [" " * 6 + line for line in text[1:]]
    return "\n".join(lines)


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
    if isinstance(exc, (MethodUnavailableError, WritebackFailedBefore, MissingNodeError,
                        MissingDependencyError, StateDirError, BusyError)):
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


def for_result(result):
    """The code for a result of the API: a CacheState or StatusReport (status),
    Verification, DropResult or Coherence report."""
    from .results import CacheState, DropResult, StatusReport, Verification

    if isinstance(result, CacheState):
        return for_state(result)
    if isinstance(result, StatusReport):
        return for_state(result.state)
    if isinstance(result, Verification):
        return for_verdict(result.verdict)
    if isinstance(result, DropResult):
        return for_drop(result)
    return for_coherence(result)


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
