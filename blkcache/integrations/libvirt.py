"""libvirt's qemu hook: drop the page cache of a domain's block disks.

On a live-migration destination the page cache may hold stale pages of a
shared block volume (read while the source was still writing).  libvirt runs
every executable in /etc/libvirt/hooks/qemu.d/ (libvirt >= 6.5) as

    HOOK GUEST OPERATION SUB-OPERATION EXTRA   (the domain XML on stdin)

and aborts the operation when one exits non-zero.  On the events in EVENTS
this hook takes the domain's ``<disk type='block'>`` sources (only
``/domain/devices/disk``, only absolute paths of block devices), expands each
into its partitions and the devices below it, reports their coherence
(stale pages are listed, not fatal), then drops their page cache with
``expect_clean``: dirty pages on a destination, a failed drop or pages left
make the hook exit 1, and libvirt aborts the start or the migration.  Every
other event exits 0 at once.  Standard output stays empty: for "migrate
begin" libvirt reads it as the (unchanged) domain XML.

The installed hook is a few lines (hook_script()) that run this module with
the interpreter and the blkcache package it was installed from, in one
process: no blkcache command, no PATH look-up.
"""

import contextlib
import os
import stat
import sys
import time
import xml.etree.ElementTree as ET

from ..messages import display as printable

#: Where --install writes the hook, below the root directory.
HOOK_PATH = "/etc/libvirt/hooks/qemu.d/blkcache"
#: libvirt's single-file hook, run before the scripts in qemu.d: never touched.
LEGACY_HOOK_PATH = "/etc/libvirt/hooks/qemu"

#: (operation, sub-operation) pairs the hook acts on:
#:   migrate begin   incoming migration, before anything is set up
#:   prepare begin   before resources are allocated (every start, and incoming migration)
#:   start begin     before the QEMU process is spawned
#:   started begin   after QEMU started (for migration: in incoming mode, after it
#:                   opened and probed the disks)
EVENTS = frozenset({("migrate", "begin"), ("prepare", "begin"), ("start", "begin"),
                    ("started", "begin")})

EXIT_REFUSED = 1

SCRIPT = """\
#!{python} -I
# blkcache {version}: libvirt qemu hook, written by `blkcache hook libvirt --install`.
# libvirt runs it as: blkcache GUEST OPERATION SUB-OPERATION EXTRA, the domain XML on stdin.
# It runs blkcache from the directory below with this interpreter; -I keeps PYTHON*
# variables, the user's site-packages and the current directory out.
import sys
sys.path.insert(0, {package_parent!r})
from blkcache.integrations.libvirt import main
sys.exit(main(sys.argv[1:]))
"""


class Log:
    """Lines on standard error, "blkcache-hook: GUEST OP SUB: message", escaped.

    libvirt keeps a hook's standard error: in the error it reports when the
    hook fails, and in its own log (log_filters "1:util.command").
    """

    def __init__(self, file=None, prefix=""):
        self.file = file if file is not None else sys.stderr
        self.prefix = prefix

    def __call__(self, message):
        try:
            print(printable(f"blkcache-hook: {self.prefix}{message}"), file=self.file,
                  flush=True)
        except OSError:
            pass    # standard error is gone: the exit status still tells


# ---- the domain XML -------------------------------------------------------------


def disk_sources(xml_text):
    """(block device paths, skipped): the sources of the domain's block disks.

    Only ``/domain/devices/disk`` elements count (a ``<disk>`` anywhere else,
    e.g. in ``<metadata>``, is not a disk of the domain), only ``type='block'``
    with a ``<source dev=...>``.  ``skipped`` lists (path, reason) for sources
    that are not absolute paths of existing block devices.  Raises
    ET.ParseError on malformed XML.
    """
    root = ET.fromstring(xml_text)
    devices, skipped = [], []
    if root.tag != "domain":
        raise ET.ParseError(f"root element is <{root.tag}>, not <domain>")
    for disk in root.findall("./devices/disk"):
        source = disk.find("./source")
        dev = source.get("dev") if disk.get("type") == "block" and source is not None else None
        if not dev or dev in devices:
            continue
        reason = _not_a_block_device(dev)
        if reason:
            skipped.append((dev, reason))
        else:
            devices.append(dev)
    return devices, skipped


def _not_a_block_device(path):
    """Why ``path`` is not taken (None: it is an absolute path of a block device)."""
    if not os.path.isabs(path):
        return "not an absolute path"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist (no page cache to drop)"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if not stat.S_ISBLK(mode):
        return "not a block device"
    return None


# ---- what the hook does -------------------------------------------------------


def _reason(exc):
    from ..errors import BlkcacheError

    if isinstance(exc, BlkcacheError):
        return str(exc)
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


def _coherence_line(report):
    name = report.path
    if report.verdict == "unknown":
        return f"{name}: coherence unknown: {report.reason}"
    if report.verdict == "coherent":
        return f"{name}: coherent: {report.compared} cached pages match the device"
    if report.verdict == "dirty":
        return (f"{name}: dirty: {report.compared} cached pages match the device, "
                f"{report.dirty} dirty pages not compared")
    line = (f"{name}: stale: {report.stale} of {report.compared} compared pages differ "
            "from the device")
    if report.dirty:
        line += f", {report.dirty} dirty pages not compared"
    for offset, length in report.stale_ranges[:4]:
        line += f"; stale offset {offset} length {length}"
    return line


def _drop_line(result):
    return (f"{result.path}: {result.before.cached} -> {result.after.cached} pages cached "
            f"(method {result.method}, {result.attempts} "
            f"attempt{'s' if result.attempts != 1 else ''})")


def protect(devices, log):
    """What `blkcache verify --coherence -r` then `blkcache drop --expect-clean -r`
    do to ``devices``, in this process, each outcome logged.

    True when every page cache is known to be empty afterwards.
    """
    from .. import api, coherence, exitcodes

    def report_coherence(outcome):
        log(_reason(outcome.error) if outcome.error is not None
            else _coherence_line(outcome.result))

    def report_drop(outcome):
        if outcome.error is not None:
            log(_reason(outcome.error))
            return
        log(_drop_line(outcome.result))
        if not outcome.result.complete:
            log(f"{outcome.path}: pages remain cached after the drop")

    api.run(devices, coherence.check, recursive=True, report=report_coherence)
    batch = api.run(devices, lambda target: target.drop(expect_clean=True),
                    recursive=True, report=report_drop)
    return batch.code == exitcodes.OK


def main(argv, stdin=None, stderr=None):
    """The hook: libvirt's arguments in ``argv``, the domain XML on ``stdin``."""
    xml_text = (stdin if stdin is not None else sys.stdin).read()   # always read it
    log = Log(stderr)
    if len(argv) < 3:
        log("usage: blkcache GUEST OPERATION SUB-OPERATION [EXTRA]")
        return EXIT_REFUSED
    guest, operation, sub = argv[:3]
    if (operation, sub) not in EVENTS:
        return 0
    started = time.monotonic()
    log = Log(stderr, f"{guest} {operation} {sub}: ")
    try:
        devices, skipped = disk_sources(xml_text)
    except ET.ParseError as exc:
        log(f"cannot parse the domain XML: {exc}; refusing {operation}")
        return EXIT_REFUSED
    for dev, reason in skipped:
        log(f"{dev}: {reason}; skipped")
    if not devices:
        log("no block device to drop")
        return 0
    count = f"{len(devices)} block device{'s' if len(devices) != 1 else ''}"
    log(f"{count}: {' '.join(devices)}")
    if not protect(devices, log):
        log(f"page cache not dropped; refusing {operation}")
        return EXIT_REFUSED
    elapsed = (time.monotonic() - started) * 1000
    log(f"page cache of {count} dropped and verified in {elapsed:.1f} ms")
    return 0


# ---- installing the hook ------------------------------------------------------


class InstallError(Exception):
    """The hook cannot be written or removed; the message says why."""


def _package_parent():
    """The directory that holds this blkcache package."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hook_script(python=None, package_parent=None):
    """The text of the hook for interpreter ``python`` and the blkcache package
    in directory ``package_parent`` (default: this interpreter and package)."""
    from .. import __version__

    python = python or sys.executable
    if not python or not os.path.isabs(python) or any(c.isspace() for c in python) \
            or len(python) > 200:
        raise InstallError(f"{printable(str(python))}: the interpreter needs an absolute "
                           "path without blanks, at most 200 characters, for a #! line")
    return SCRIPT.format(python=python, version=__version__,
                         package_parent=package_parent or _package_parent())


def untrusted(paths):
    """Lines for each path libvirtd would run as root that someone else could change:
    not owned by root, or writable by group or others."""
    lines = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            lines.append(f"{path}: cannot stat: {exc.strerror}")
            continue
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            lines.append(f"{path} (uid {info.st_uid}, mode "
                         f"{stat.S_IMODE(info.st_mode):04o}) can be changed by others than "
                         "root, and libvirtd runs the hook as root with it")
    return lines


def _under(root, path):
    return os.path.join(root, path.lstrip("/"))


def install(root="/", python=None):
    """Write the hook atomically as HOOK_PATH below ``root`` (root-owned when run
    as root, mode 0755).  Returns (path, notes): notes are lines for the user."""
    import tempfile  # not at the top: the hook itself never needs it

    path = _under(root, HOOK_PATH)
    python = python or sys.executable
    text = hook_script(python)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blkcache.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), 0, 0)
                os.fchmod(f.fileno(), 0o755)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise InstallError(f"{path}: cannot write: {exc.strerror}") from exc
    package = os.path.join(_package_parent(), "blkcache")
    notes = untrusted([os.path.realpath(python), package, os.path.dirname(package)])
    notes.append("libvirtd reads its hooks when it starts: restart libvirtd (or virtqemud) "
                 "for this hook to run")
    legacy = _under(root, LEGACY_HOOK_PATH)
    if os.path.lexists(legacy):
        notes.append(f"{legacy} exists and was left untouched; libvirt runs it before "
                     f"{HOOK_PATH}" + (" (it looks like an older blkcache hook: remove it, "
                                       "or blkcache runs twice)"
                                       if _mentions_blkcache(legacy) else ""))
    return path, notes


def _mentions_blkcache(path):
    """Whether the regular file ``path`` mentions blkcache (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        return stat.S_ISREG(os.fstat(fd).st_mode) and b"blkcache" in f.read(1 << 16)


def uninstall(root="/"):
    """Remove the hook below ``root``; returns (path, removed)."""
    path = _under(root, HOOK_PATH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return path, False
    except OSError as exc:
        raise InstallError(f"{path}: {exc.strerror}") from exc
    return path, True
