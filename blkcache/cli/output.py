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


class GuardedStdout(io.TextIOWrapper):
    """sys.stdout for one command: the first write error is kept, not raised,
    and output after it is discarded.  A reader that went away (EPIPE) or a
    full disk must not turn a device's result into a device error."""

    lost = None

    @classmethod
    def install(cls):
        out = sys.stdout
        if getattr(out, "buffer", None) is None:
            return None
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
        self.flush()
        sys.stdout = self.original
        with contextlib.suppress(ValueError):
            self.detach()
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
