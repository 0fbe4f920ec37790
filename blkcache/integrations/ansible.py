"""What the Ansible modules of the ``blkcache.blkcache`` collection do on a managed host.

The collection (``ansible/`` in the source tree) ships two thin modules,
``page_cache`` and ``page_cache_info``: they parse their arguments with
AnsibleModule, call page_cache() or info() here, and pass the dict returned
to ``exit_json``, or a Failure's to_dict() to ``fail_json``.  Nothing here
imports Ansible.

Every device is opened, type-checked and its range validated before any is
read.  For ``state="dropped"`` every device is also checked before any is
dropped: no failed write-back on record, the method available, and under
``expect_clean`` no dirty or writeback page (the kernel must be able to
tell).  A range known to hold no cached page is left alone (``changed``
False); in check mode nothing is dropped and ``changed`` says where pages
are cached.  Every failure carries one line and blkcache's exit code.
"""

import contextlib

from .. import api, dropping, exitcodes
from ..constants import DEFAULT_RETRIES, MAX_RETRIES
from ..errors import BlkcacheError, UsageError

STATES = ("dropped", "verified")


class Failure(Exception):
    """A failed task: ``msg`` (one line), ``rc`` (blkcache's exit code) and
    the rest of the module's output (``changed``, ``devices``)."""

    def __init__(self, msg, rc, changed=False, devices=None):
        super().__init__(msg)
        self.msg = msg
        self.rc = rc
        self.changed = changed
        self.devices = devices or []

    def to_dict(self):
        return {"msg": self.msg, "rc": self.rc, "changed": self.changed,
                "devices": self.devices}


def _describe(exc):
    from ..messages import describe  # the same one line as the command line's

    return describe(exc)


@contextlib.contextmanager
def _failing():
    """Turn an API error into a Failure (nothing has changed yet)."""
    try:
        yield
    except (OSError, BlkcacheError) as exc:
        raise Failure(_describe(exc), exitcodes.for_error(exc)) from None


def _open(devices, offset, length, stack):
    """[(target, range)] for every device, or a Failure before any is read."""
    paths = [devices] if isinstance(devices, str) else list(devices)
    with _failing():
        if not paths:
            raise UsageError("no device given")
        targets = api.open_targets(paths, stack)
        return [(target, target.range(offset or 0, length)) for target in targets]


def info(devices, offset=None, length=None):
    """page_cache_info: the status of each device; never changes anything."""
    with contextlib.ExitStack() as stack:
        opened = _open(devices, offset, length, stack)
        with _failing():
            states = [target.status(rng=rng) for target, rng in opened]
    return {"changed": False, "rc": exitcodes.OK,
            "devices": [state.to_dict() for state in states]}


def page_cache(devices, state="dropped", expect_clean=False, method="auto", offset=None,
               length=None, retries=DEFAULT_RETRIES, check_mode=False):
    """page_cache: drop (``state="dropped"``) or verify each device's cache."""
    with _failing():
        if state not in STATES:
            raise UsageError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        if not 0 <= retries <= MAX_RETRIES:
            raise UsageError(f"retries must be between 0 and {MAX_RETRIES}")
    with contextlib.ExitStack() as stack:
        opened = _open(devices, offset, length, stack)
        if state == "verified":
            return _finish(*_verify(opened))
        plans = _check_drops(opened, method, expect_clean)
        return _finish(*_drop(plans, expect_clean, retries, check_mode))


def _finish(records, problems, codes):
    changed = any(record.get("changed") for record in records)
    rc = exitcodes.combine(codes)
    if problems:
        raise Failure("; ".join(problems), rc, changed, records)
    return {"changed": changed, "rc": rc, "devices": records}


def _verify(opened):
    records, problems, codes = [], [], []
    for target, rng in opened:
        try:
            check = target.verify(rng=rng)
        except (OSError, BlkcacheError) as exc:
            problems.append(_describe(exc))
            codes.append(exitcodes.for_error(exc))
            continue
        st = check.state
        records.append({"device": target.path, "path": target.device, "changed": False,
                        "verdict": check.verdict, "status": st.to_dict()})
        codes.append(exitcodes.for_verdict(check.verdict))
        if check.verdict == "resident":
            problems.append(f"{target.path}: {st.cached} of {st.pages} pages cached")
        elif check.verdict == "unknown":
            problems.append(f"{target.path}: unknown: {st.reason}")
    return records, problems, codes


def _check_drops(opened, method, expect_clean):
    """[(target, range, dropping.Checked)] for every device, or one Failure
    naming every device that cannot be dropped: then nothing is dropped."""
    plans, problems, codes = [], [], []
    for target, rng in opened:
        try:
            plans.append((target, rng, dropping.check(target, rng, method, expect_clean)))
        except (OSError, BlkcacheError) as exc:
            problems.append(_describe(exc))
            codes.append(exitcodes.for_error(exc))
    if problems:
        raise Failure("; ".join(problems) + (
            "; no device was dropped" if len(opened) > 1 else ""), exitcodes.combine(codes))
    return plans


def _record(target, checked, changed, after=None, attempts=0):
    return {"device": target.path, "path": target.device, "changed": changed,
            "method": checked.method, "attempts": attempts,
            "before": checked.before.to_dict(),
            "after": after.to_dict() if after is not None else None,
            "warning": checked.warning}


def _drop(plans, expect_clean, retries, check_mode):
    records, problems, codes = [], [], []
    for target, rng, checked in plans:
        before = checked.before
        if before.clean is True:
            records.append(_record(target, checked, False, after=before))
            codes.append(exitcodes.OK)
            continue
        if check_mode:
            records.append(_record(target, checked, True))
            if before.clean is None:
                problems.append(f"{target.path}: unknown: {before.reason}")
                codes.append(exitcodes.UNKNOWN)
            continue
        try:
            # Checked again as it drops: a page may have been dirtied since.
            result = dropping.drop(target, rng, checked.method, expect_clean, retries)
        except (OSError, BlkcacheError) as exc:
            records.append(_record(target, checked, False))
            problems.append(_describe(exc))
            codes.append(exitcodes.for_error(exc))
            continue
        records.append(_record(target, checked, True, result.after, result.attempts))
        codes.append(exitcodes.for_drop(result))
        if result.after.clean is None:
            problems.append(f"{target.path}: dropped with {result.method}, but "
                            f"cannot verify: {result.after.reason}")
        elif not result.after.clean:
            problems.append(f"{target.path}: {result.after.cached} pages still cached "
                            f"after {result.attempts} attempts with {result.method} (mapped "
                            "pages, a mounted file system or I/O in flight keep pages)")
    return records, problems, codes
