"""Prometheus metrics of block devices' page cache, for node_exporter's textfile collector.

node_exporter has no page-cache metrics of block devices (they need root,
prometheus/node_exporter#1596); its textfile collector reads ``*.prom``
files that a privileged job writes.  ``blkcache status --textfile PATH``
is that job; ``--prometheus`` prints the same text.

The exposition is prometheus_client's (the ``prometheus`` extra): a custom
collector over readings already taken, ``generate_latest`` for the text
format (which escapes label values: device paths may hold quotes,
backslashes and newlines) and ``write_to_textfile``, which writes a
temporary file in the same directory and renames it over PATH.

One series per device and quantity, in base units:

  blkcache_page_cache_bytes{device, state="cached"|"dirty"|"writeback"}
  blkcache_device_size_bytes{device}
  blkcache_page_cache_exact{device}            1, or 0 when the kernel will not tell
  blkcache_writeback_failure_recorded{device}  1 while a failed write-back is on record
  blkcache_last_reading_timestamp_seconds{device}

A count the kernel did not give (exact 0; dirty and writeback where
mincore(2) answered) has no series: it is absent, never 0.
"""

import time
from typing import NamedTuple

from .. import failures
from ..errors import MissingDependencyError
from ..results import CacheState

EXTRA = "pip install 'blkcache[prometheus]'"
CACHE_STATES = ("cached", "dirty", "writeback")


class Reading(NamedTuple):
    """One device's page-cache state and when it was read."""

    state: CacheState
    failure_recorded: bool
    time: float             # seconds since the epoch, after the reading


def require():
    """Import prometheus_client, or raise MissingDependencyError saying how to get it."""
    try:
        import prometheus_client
    except ImportError:
        raise MissingDependencyError(
            "Prometheus output needs the Python package prometheus_client",
            fix=EXTRA) from None
    return prometheus_client


def read(target, interface="auto"):
    """A Reading of the whole of an open blkcache.api.Target."""
    state = target.status(interface=interface)
    return Reading(state, failures.lookup(target.fd) is not None, time.time())


def read_all(paths, interface="auto", recursive=False, report=None):
    """An api.Batch of Readings of every device, as ``blkcache status`` opens
    them (see api.run: bad input stops before any is read); its code is
    status's exit code (3 where the kernel will not tell)."""
    from .. import api, exitcodes

    return api.run(paths, lambda target: read(target, interface), recursive, report,
                   code_of=lambda reading: exitcodes.for_state(reading.state))


def label(path):
    """A device path as a label value: UTF-8, undecodable bytes as \\xNN
    (quotes, backslashes and newlines are escaped by the exposition)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class CacheCollector:
    """A prometheus_client collector of the gauges above, for given readings."""

    def __init__(self, readings):
        self.readings = list(readings)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name, doc, labels=("device",)):
            return GaugeMetricFamily(name, doc, labels=list(labels))

        cache = gauge("blkcache_page_cache_bytes",
                      "Bytes of the device in the page cache, by page state "
                      "(absent where the kernel does not tell).", ("device", "state"))
        size = gauge("blkcache_device_size_bytes", "Size of the device.")
        exact = gauge("blkcache_page_cache_exact",
                      "1 when the kernel reported the page cache, 0 when it will not "
                      "tell this user.")
        failed = gauge("blkcache_writeback_failure_recorded",
                       "1 while a failed write-back of the device is on record "
                       "(drops refuse: its cached pages may be the only copy of data).")
        stamp = gauge("blkcache_last_reading_timestamp_seconds",
                      "When the device's page cache was read, in seconds since the epoch.")
        for reading in self.readings:
            state = reading.state
            device = label(state.path)
            for name in CACHE_STATES:
                pages = getattr(state, name)
                if state.exact and pages is not None:
                    cache.add_metric([device, name], pages * state.page_size)
            size.add_metric([device], state.size)
            exact.add_metric([device], 1 if state.exact else 0)
            failed.add_metric([device], 1 if reading.failure_recorded else 0)
            stamp.add_metric([device], reading.time)
        return [cache, size, exact, failed, stamp]


def _registry(readings):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(readings))
    return registry


def exposition(readings):
    """The text exposition format of readings (a str)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(readings)).decode("utf-8")


def write_textfile(path, readings):
    """Write the exposition to path atomically (temporary file, then rename);
    an OSError names path, not the temporary file."""
    from prometheus_client import write_to_textfile

    try:
        write_to_textfile(path, _registry(readings))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from exc
