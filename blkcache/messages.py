"""One-line messages about paths and errors, for every front end.

The command line (blkcache.cli.render), the libvirt hook and the Ansible
modules all say the same thing the same way: a path escaped onto one line,
an exception raised by the library as one line.  Pure functions, no I/O.
"""


def display(path):
    """A path printable on one line: undecodable bytes and controls escaped."""
    if path is None:
        return ""
    text = path if isinstance(path, str) else str(path)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def count(value):
    return "?" if value is None else str(value)


def describe(exc):
    """One line for an exception raised by the API."""
    from .errors import BlkcacheError, MissingNodeError, WritebackError

    if isinstance(exc, MissingNodeError):
        rel = exc.related
        return (f"{display(rel.name)} ({rel.rdev}, {rel.relation} of "
                f"{display(rel.parent)}): no device node in /dev; not handled")
    path = getattr(exc, "path", None) if isinstance(exc, BlkcacheError) else exc.filename
    where = f"{display(path)}: " if path else ""
    if isinstance(exc, WritebackError):
        return where + _writeback_failure(exc)
    if isinstance(exc, BlkcacheError):
        fix = getattr(exc, "fix", None)
        return f"{where}{exc.message}" + (f" (fix: {fix})" if fix else "")
    return f"{where}{exc.strerror or exc}"


def _writeback_failure(exc):
    dirty = exc.before.dirty if exc.before is not None else None
    still = exc.after.dirty if exc.after is not None else None
    if exc.record:
        later = f"later drops refuse until --discard-failed; record {exc.record}"
    else:
        later = (f"the failure could not be recorded ({exc.record_error}): do not drop "
                 "this device again before the data is safe")
    return (f"write-back failed: {exc.strerror}; {count(dirty)} pages were dirty, "
            f"{count(still)} still dirty; nothing was dropped (the cached pages may "
            f"be the only copy of that data; {later})")
