"""Where the command line writes: one-line errors on stderr, JSON, a guarded
stdout, and a progress bar for long scans."""

import contextlib
import io
import os
import sys
import time

import click

from . import render


def error(message):
    """``blkcache: MESSAGE`` on stderr (nothing if stderr is gone)."""
    try:
        click.echo(f"blkcache: {message}", err=True)
    except OSError:
        pass    # stderr is gone or full: the exit status still tells


def report_error(outcome):
    """An api.run() report: one error line for a device that failed."""
    if outcome.error is not None:
        error(render.describe(outcome.error))


def emit_json(data, indent=2):
    """``data`` as JSON: indented, or on one line (JSON Lines) with indent None."""
    import json

    click.echo(json.dumps(data, indent=indent))


def fill_standard_fds():
    """Put /dev/null on a closed descriptor 0, 1 or 2, so that no device or
    record opened later takes its number (and the helper inherits nothing
    of ours there).  sys.stdout stays None: GuardedStdout sees it closed."""
    import fcntl

    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            with contextlib.suppress(OSError):
                os.open(os.devnull, os.O_RDWR)     # the lowest free number: fd


class _ClosedStdout(io.RawIOBase):
    """Where output goes when standard output was closed (`>&-`): nowhere,
    but what was written is remembered, to be reported as lost."""

    written = False

    def writable(self):
        return True

    def write(self, data):
        if len(data):
            self.written = True
        return len(data)


def emit_batch(batch, recursive):
    """An api.Batch as JSON: "devices" (each with its "relation" and
    "parent" under --recursive) and "not_checked" (the related devices left
    out without it)."""
    devices = []
    for outcome in batch.outcomes:
        if outcome.error is not None:
            continue
        record = outcome.result.to_dict()
        if recursive:
            rel = outcome.relation
            record = {**record, "relation": rel.relation if rel else "self",
                      "parent": rel.parent if rel else None}
        devices.append(record)
    emit_json({"devices": devices,
               "not_checked": [rel.to_dict() for rel in batch.not_checked]})


def not_checked(batch, quiet=False):
    """The one line about related devices not checked, on stderr (not with -q)."""
    line = render.not_checked_line(batch.not_checked)
    if line and not quiet:
        error(line)


def finish(batch, recursive, as_json, quiet=False):
    """The end of a command over several devices: the JSON of every outcome,
    or the line about related devices not checked; the combined exit code."""
    if as_json:
        emit_batch(batch, recursive)
    else:
        not_checked(batch, quiet)
    return batch.code


class GuardedStdout(io.TextIOWrapper):
    """sys.stdout for one command: the first write error is kept, not raised,
    and output after it is discarded.  A reader that went away (EPIPE) or a
    full disk must not turn a device's result into a device error; output
    that could not be delivered (a full disk, standard output closed) is
    reported by remove()."""

    lost = None
    closed_stdout = None

    @classmethod
    def install(cls):
        out = sys.stdout
        if out is None:
            closed = _ClosedStdout()
            guard = cls(io.BufferedWriter(closed), encoding="utf-8",
                        errors="surrogateescape")
            guard.closed_stdout = closed
        elif getattr(out, "buffer", None) is None:
            return None
        else:
            out.flush()
            guard = cls(out.buffer, encoding=out.encoding, errors=out.errors,
                        line_buffering=out.line_buffering)
        guard.original = out
        sys.stdout = guard
        return guard

    def write(self, text):
        if self.lost is None:
            try:
                return super().write(text)
            except OSError as exc:
                self._lose(exc)
        return len(text)

    def flush(self):
        if self.lost is None:
            try:
                super().flush()
            except OSError as exc:
                self._lose(exc)

    def _lose(self, exc):
        self.lost = exc
        # Bytes still buffered would fail again at exit: send them nowhere.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(devnull, self.buffer.fileno())
            os.close(devnull)

    def remove(self):
        """Put the real stdout back; the first write error, or None."""
        import errno

        self.flush()
        sys.stdout = self.original
        with contextlib.suppress(ValueError):
            self.detach()
        if self.lost is None and self.closed_stdout is not None and \
                self.closed_stdout.written:
            self.lost = OSError(errno.EBADF, "standard output is closed")
        return self.lost


class Progress:
    """A click progress bar on standard error for scans that run long.

    Nothing is drawn unless ``enabled`` (not --json), standard error is a
    terminal, and the scan has already run for ``delay`` seconds: short
    scans and piped runs stay silent.  Call it as progress(done, total).
    """

    def __init__(self, label, enabled=True, delay=1.0, file=None):
        self.label = label
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and _isatty(self.file)
        self.delay = delay
        self.clock = time.monotonic
        self.started = self.clock()
        self.bar = None
        self.done = 0

    def __call__(self, done, total):
        if not self.enabled:
            return
        if self.bar is None:
            if self.clock() - self.started < self.delay:
                return
            self.bar = click.progressbar(length=max(total, 1), label=self.label,
                                         file=self.file)
            self.bar.__enter__()
        self.bar.update(max(0, done - self.done))
        self.done = done

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _isatty(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
