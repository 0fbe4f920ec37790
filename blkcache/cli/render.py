"""Text for people: every line the command line prints about a result or an
error.  Pure functions of library results; nothing here does I/O."""

import time

from ..messages import count as _count
from ..messages import describe, display  # noqa: F401 (the CLI's one-line messages)
from ..sizes import format_size

# -- status ------------------------------------------------------------------------

def _pages(state, value):
    if not state.exact:
        return "?"
    return "-" if value is None else str(value)


def _size(value, in_bytes):
    if value is None:
        return "?"
    return str(value) if in_bytes else format_size(value)


def table(states, in_bytes=False, noheadings=False, relations=None):
    """status: one row per CacheState, like fincore(1); with ``relations``
    (--recursive: a blkcache.stack.Related or None per state), a RELATION
    column before DEVICE."""
    header = ("RES", "PAGES", "SIZE", "DIRTY", "WRITEBACK")
    rows = [(_size(s.cached_bytes, in_bytes), _pages(s, s.cached), _size(s.length, in_bytes),
             _pages(s, s.dirty), _pages(s, s.writeback)) for s in states]
    if relations is not None:
        header += ("RELATION",)
        rows = [row + (relation_cell(rel),) for row, rel in zip(rows, relations)]
    rows = [row + (display(s.path),) for row, s in zip(rows, states)]
    if not noheadings:
        rows.insert(0, header + ("DEVICE",))
    last = len(header)
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    return "\n".join(" ".join(cell.rjust(w) if i < 5 else cell.ljust(w)
                              for i, (cell, w) in enumerate(zip(row, widths)))
                     + " " + row[last] for row in rows)


def relation_cell(rel):
    """The RELATION column: self, or relation:parent (holder:loop0)."""
    if rel is None or rel.relation == "self":
        return "self"
    return f"{rel.relation}:{display(rel.parent)}"


def label(path, rel=None):
    """A row's name in lines: the path, and for a related device its relation."""
    if rel is None or rel.relation == "self":
        return display(path)
    return f"{display(path)} ({rel.relation} of {display(rel.parent)})"


def not_checked_line(rels):
    """One line naming the related devices that were not checked, or None."""
    if not rels:
        return None
    shown = ", ".join(f"{display(rel.name)}: {rel.relation} of {display(rel.parent)}"
                      for rel in rels[:4])
    more = f", and {len(rels) - 4} more" if len(rels) > 4 else ""
    noun = "device" if len(rels) == 1 else "devices"
    return f"{len(rels)} related {noun} not checked ({shown}{more}); use -r"


def status_extras(reports):
    """status --map and --holders: lines for each api.StatusReport."""
    for report in reports:
        name = display(report.state.path)
        if report.map is not None:
            rmap = report.map
            per = rmap.length // max(1, len(rmap.bucket_pages))
            yield (f"{name}: {rmap.render()} {format_size(rmap.length)}, "
                   f"{format_size(per)} per column")
        if report.holders is not None:
            yield from (f"{name}: {line}" for line in _holder_lines(report.holders))


def _holder_lines(held):
    lines = [display(h.describe()) for h in held.processes + held.mounts + held.stacked]
    if held.rdev is None:
        lines = ["holders are listed for block devices only"]
    elif not lines:
        lines = ["no other holder (the cache goes when the last opener closes it)"]
    if held.unreadable:
        lines.append(f"{held.unreadable} process(es) could not be inspected (permission)")
    return lines


def beyond_end_note(state):
    """Mention pages cached past the end of a device that shrank."""
    if not state.beyond_end:
        return ""
    return (f" ({state.beyond_end} of them past the end of the device, which shrank: "
            "stale if it grows again)")


# -- drop and verify ---------------------------------------------------------------

_METHOD_NAMES = {"ioctl": "BLKFLSBUF", "fadvise": "posix_fadvise",
                 "helper": "BLKFLSBUF via blkcache-flush"}


def drop_line(result, rel=None):
    before, after = result.before, result.after
    method = _METHOD_NAMES.get(result.method, result.method)
    name = label(result.path, rel)
    if after.cached is None:
        return (f"{name}: dropped with {method}; the kernel will not tell "
                "this user whether pages remain (unknown)")
    text = (f"{name}: {_count(before.cached)} -> {after.cached} pages cached "
            f"({format_size(after.page_size * (result.dropped or 0))} dropped with {method}, "
            f"{result.attempts} attempt{'s' if result.attempts != 1 else ''})")
    if after.cached:
        text += ("; pages remain: mapped pages (mmap), pages held by a mounted file system "
                 "and pages under I/O survive a drop")
    return text + beyond_end_note(before)


def drop_warning(result):
    return f"warning: {display(result.path)}: {result.warning}"


def verify_line(check, rel=None):
    state = check.state
    name = label(state.path, rel)
    if check.verdict == "unknown":
        return f"{name}: unknown: {state.reason}"
    return (f"{name}: {check.verdict}: {state.cached} of {state.pages} pages "
            f"({format_size(state.cached_bytes)}) cached" + beyond_end_note(state))


def coherence_lines(report, rel=None):
    """Text lines for one coherence report."""
    name = label(report.path, rel)
    if report.verdict == "unknown":
        return [f"{name}: unknown: {report.reason}"]
    head = {"coherent": f"coherent: {report.compared} cached pages match the device",
            "stale": f"stale: {report.stale} of {report.compared} compared pages differ "
                     "from the device",
            "dirty": f"dirty: {report.compared} cached pages match the device, "
                     f"{report.dirty} dirty pages could not be compared"}[report.verdict]
    lines = [f"{name}: {head} ({report.resident} resident, {report.dirty} dirty and "
             f"{report.vanished} evicted not compared)"]
    for kind, ranges in (("stale", report.stale_ranges), ("dirty", report.dirty_ranges),
                         ("evicted", report.vanished_ranges)):
        for off, length in ranges:
            lines.append(f"  {kind} offset {off} length {length} "
                         f"({length // report.page_size} pages, {format_size(length)})")
    if report.truncated:
        lines.append("  (more ranges not listed; counts are exact)")
    if report.read_in:
        lines.append(f"  {report.read_in} pages evicted in the instant before their "
                     "comparison were read back in by it")
    return lines


# -- watch -------------------------------------------------------------------------

WATCH_HEADER = f"{'TIME':>12} {'RES':>7} {'PAGES':>10} {'DIRTY':>8} {'WRITEBACK':>9} DEVICE"


def watch_line(sample, in_bytes=False):
    s = sample.state
    stamp = time.strftime("%H:%M:%S", time.localtime(sample.time))
    stamp += f".{int(sample.time * 1000) % 1000:03d}"
    res = _size(s.cached_bytes, in_bytes)
    return (f"{stamp:>12} {res:>7} {_pages(s, s.cached):>10} {_pages(s, s.dirty):>8} "
            f"{_pages(s, s.writeback):>9} {display(s.path)}")


# -- doctor ------------------------------------------------------------------------

_YES = {True: "yes", False: "no", None: "unknown"}


def _caps_text(report):
    caps = report.effective_caps
    if not caps:
        text = "none"
    elif len(caps) <= 4:
        text = ", ".join(caps)
    else:
        text = f"{len(caps)} capabilities"
    return text + (f" (cap_sys_admin: {_YES[report.cap_sys_admin]}, "
                   f"cap_fowner: {_YES[report.cap_fowner]})")


def _helper_text(helper):
    if helper.installed is False:
        return "not installed"
    if helper.usable:
        return f"{helper.capabilities}, usable"
    verdict = "not trusted" if helper.trusted is False else "not usable"
    return f"{helper.capabilities or 'no file capability'}, {verdict}"


def _device_line(dev):
    if not dev.opened:
        return f"device:        {display(dev.path)}: cannot use: {dev.error}"
    verdict = "counts" if dev.answers else "\"unknown\" (exit 3)"
    return (f"device:        {display(dev.path)}: {dev.kind}; cachestat {dev.cachestat}, "
            f"mincore {dev.mincore}: status/verify give {verdict}; drop uses "
            f"{dev.drop_method}")


def doctor(report):
    """blkcache doctor's report as text."""
    helper = report.helper
    lines = [
        f"kernel:        Linux {report.kernel}, cachestat(2) "
        + {True: "available", False: "missing (mincore fallback)",
           None: "unknown"}[report.cachestat_available]
        + ", disk sequence numbers "
        + {True: "yes", False: "no (failure records block by major:minor)",
           None: "unknown"}[report.diskseq],
        f"user:          {display(report.user)} (uid {report.uid}), "
        f"no_new_privs: {_YES[report.no_new_privs]}",
        f"capabilities:  {_caps_text(report)}",
        f"helper:        {display(helper.path)} ({_helper_text(helper)})",
        *(f"  not used:    {display(c.path)}: {c.why_not}"
          for c in report.helpers if not c.used and c.path != helper.path),
        f"drop method:   {report.drop_method.method}: {report.drop_method.reason}",
    ]
    lines += [_device_line(dev) for dev in report.devices]
    lines.append(f"failures:      {len(report.failures) or 'none'} on record in "
                 f"{display(report.state_dir)}")
    lines += [f"  - {failure_line(failure)}" for failure in report.failures]
    if report.problems:
        lines.append("problems:")
        for problem in report.problems:
            lines.append(f"  - {display(problem.subject)}: {problem.problem}")
            if problem.fix:
                lines.append(f"    fix: {problem.fix}")
    else:
        lines.append("problems:      none")
    if helper.installed and not helper.cap_sys_admin:
        lines.append("To let users without CAP_SYS_ADMIN drop with BLKFLSBUF, run as root:")
        lines.append(f"  {report.setcap_command}")
    return "\n".join(lines)


# -- failed write-backs on record ---------------------------------------------------

_STATES = {"live": "live: drop refuses until --discard-failed",
           "stale": "stale: that device instance is gone, it blocks nothing "
                    "(blkcache failures --prune)",
           "unknown": "unknown: no disk sequence number to tell; it blocks"}


def _stamp(when):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "?"


def failure_line(failure):
    """One record, for doctor: device, when, error, pages, state."""
    import os

    key = failure.key
    if failure.problem is not None:
        head = f"{display(failure.record)}: cannot be read ({display(failure.problem)})"
    else:
        seq = f", diskseq {key.seq}" if key is not None and key.seq is not None else ""
        head = (f"{display(failure.path)} ({key.rdev if key else '?'}{seq}): "
                f"{_stamp(failure.when)}, {os.strerror(failure.errno)}, "
                f"{_count(failure.dirty)} pages were dirty")
    return f"{head}; {_STATES.get(failure.state, failure.state)}"


def failures_table(found):
    """blkcache failures: STATE WHEN ERROR PAGES RDEV DISKSEQ PATH."""
    import errno

    rows = [("STATE", "WHEN", "ERROR", "PAGES", "RDEV", "DISKSEQ", "PATH")]
    for f in found:
        key = f.key
        path = display(f.path) if f.problem is None else \
            f"{display(f.record)} (cannot be read: {display(f.problem)})"
        rows.append((f.state or "?", _stamp(f.when), errno.errorcode.get(f.errno, str(f.errno)),
                     _count(f.dirty), key.rdev if key else "?",
                     str(key.seq) if key is not None and key.seq is not None else "-", path))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join(" ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " " + row[6]
                     for row in rows)


def removed_line(failure):
    """blkcache failures --clear/--prune: one record removed."""
    return f"removed {display(failure.record)} ({display(failure.path)}, {failure.state})"
