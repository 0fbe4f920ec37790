#!/usr/bin/python
# Copyright: blkcache maintainers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module blkcache.blkcache.page_cache: drop or verify page caches."""

DOCUMENTATION = r"""
---
module: page_cache
short_description: Drop or verify the page cache of block devices
version_added: "0.1.0"
description:
  - Before a migrated guest reads its shared volume, the destination host's page cache must
    hold no stale page of it. With O(state=dropped) this module writes back dirty pages
    (C(fdatasync)), drops the cache of each device (C(BLKFLSBUF) or C(posix_fadvise)) and
    checks that no page is left, as C(blkcache drop) does.
  - O(state=dropped) is idempotent. A range the kernel reports as holding no cached page is
    left alone and the device reports C(changed=false). In check mode nothing is dropped and
    a device reports C(changed=true) where pages are cached.
  - With O(state=verified) the module fails unless the kernel reports that no page of the
    range is cached, as C(blkcache verify) does. It never changes anything.
  - Every device is opened and checked before any is dropped. A bad path, a bad range, an
    unavailable method, a failed write-back on record or, with O(expect_clean), a dirty page
    on any device fails the task and nothing is dropped.
  - Every failure has one line in RV(msg) and blkcache's exit code in RV(rc). Dirty data is
    never discarded; after a failed write-back nothing is dropped.
  - The module runs the blkcache Python API on the managed host.
options:
  device:
    description:
      - Block devices (or regular files, such as images on shared storage) whose page cache
        to drop or verify.
      - A string is one device, unless it holds commas (Ansible splits a string at commas);
        give such a path in a list.
    type: list
    elements: str
    required: true
    aliases: [devices]
  state:
    description:
      - V(dropped) writes back, drops and verifies the cache of each device.
      - V(verified) fails when pages of a device are cached, or when the kernel will not
        tell whether they are.
    type: str
    choices: [dropped, verified]
    default: dropped
  expect_clean:
    description:
      - For migration destinations, where a dirty page of a shared volume would overwrite
        newer data. With O(state=dropped), fail if any page of any device is dirty or under
        write-back, or if the kernel will not tell; then nothing is flushed or dropped.
      - Ignored with O(state=verified).
    type: bool
    default: false
  method:
    description:
      - V(ioctl) is C(BLKFLSBUF) in the module's process (whole device; needs
        C(CAP_SYS_ADMIN)).
      - V(helper) is C(BLKFLSBUF) through the setcap helper C(blkcache-flush).
      - V(fadvise) is C(posix_fadvise(POSIX_FADV_DONTNEED)), no privilege needed.
      - V(auto) picks ioctl, else helper, else fadvise with a warning.
    type: str
    choices: [auto, ioctl, helper, fadvise]
    default: auto
  retries:
    description:
      - With O(state=dropped), how many times pages that survive a drop (readahead still in
        flight) are dropped again, with a growing pause. From 0 to 20.
    type: int
    default: 6
notes:
  - A device's page cache lives only while some process holds it open, such as the QEMU
    that uses the volume.
  - Dropping the whole device with C(BLKFLSBUF) needs root or the setcap helper; see
    C(blkcache doctor) on the host.
  - "Exit codes in RV(rc): 0 success, 1 pages remain cached, 2 bad input, 3 unknown (the
    kernel will not tell), 4 dirty pages under O(expect_clean), 5 failure (permission, I/O
    error, failed write-back now or on record), 32 and 64 every or some of several devices
    failed."
seealso:
  - module: blkcache.blkcache.page_cache_info
author:
  - blkcache maintainers
extends_documentation_fragment:
  - blkcache.blkcache.page_cache
"""

EXAMPLES = r"""
- name: Migration destination - drop the volume's stale pages, refuse if any page is dirty
  blkcache.blkcache.page_cache:
    device: /dev/archip0
    state: dropped
    expect_clean: true

- name: Drop the cache of several devices without privilege
  blkcache.blkcache.page_cache:
    device:
      - /dev/rbd0
      - /dev/rbd1
    method: fadvise

- name: Fail unless no page of the first MiB is cached
  blkcache.blkcache.page_cache:
    device: /dev/drbd1
    state: verified
    length: 1M

- name: See what a drop would change (nothing is dropped)
  blkcache.blkcache.page_cache:
    device: /dev/archip0
  check_mode: true
  register: would_drop
"""

RETURN = r"""
rc:
  description: The exit code the blkcache command would give (0 on success).
  returned: when blkcache could be imported
  type: int
  sample: 4
msg:
  description: One line saying what failed, device by device.
  returned: failure
  type: str
  sample: "/dev/loop1: 2 dirty and 0 writeback pages on a device expected clean; nothing
    was flushed or dropped"
devices:
  description: One entry per device, in the order given.
  returned: when blkcache could be imported
  type: list
  elements: dict
  contains:
    device:
      description: The path as given.
      type: str
      sample: /dev/archip0
    path:
      description: The canonical path of what was opened.
      type: str
      sample: /dev/loop1
    changed:
      description: Whether this device's cache was dropped (or, in check mode, would be).
      type: bool
      sample: true
    method:
      description: With O(state=dropped), the drop method used (or that would be used),
        V(ioctl), V(helper) or V(fadvise).
      type: str
      sample: ioctl
    attempts:
      description: With O(state=dropped), how many times the drop ran (0 when nothing was
        dropped).
      type: int
      sample: 1
    before:
      description: With O(state=dropped), the page cache before the drop; the same fields
        as RV(devices[].status).
      type: dict
    after:
      description: With O(state=dropped), the page cache after the drop; the same fields as
        RV(devices[].status). Equal to RV(devices[].before) when nothing needed dropping;
        null in check mode and when the drop failed.
      type: dict
    warning:
      description: Set when O(method=auto) falls back to posix_fadvise on a whole device.
      type: str
    verdict:
      description: With O(state=verified), V(clean), V(resident) or V(unknown).
      type: str
      sample: clean
    status:
      description: With O(state=verified), the page cache of the range.
      type: dict
      contains:
        cached:
          description: Pages cached, null when the kernel will not tell.
          type: int
        cached_bytes:
          description: Bytes cached, null when the kernel will not tell.
          type: int
        dirty:
          description: Dirty pages, null when the kernel does not tell.
          type: int
        writeback:
          description: Pages under write-back, null when the kernel does not tell.
          type: int
        size:
          description: Size of the device in bytes.
          type: int
        pages:
          description: Pages in the range.
          type: int
        exact:
          description: False when the kernel will not tell this user (see C(reason)).
          type: bool
        reason:
          description: Why the kernel does not tell, else null.
          type: str
        interface:
          description: V(cachestat), V(mincore) or V(none).
          type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.blkcache.blkcache.plugins.module_utils.blkcache import (  # noqa: E402
    call,
)

ARGUMENT_SPEC = dict(
    device=dict(type="list", elements="str", required=True, aliases=["devices"]),
    state=dict(type="str", choices=["dropped", "verified"], default="dropped"),
    expect_clean=dict(type="bool", default=False),
    method=dict(type="str", choices=["auto", "ioctl", "helper", "fadvise"], default="auto"),
    offset=dict(type="str"),
    length=dict(type="str"),
    retries=dict(type="int", default=6),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    result = call(
        module, "page_cache", params["device"], params["state"], params["expect_clean"],
        params["method"], params["offset"], params["length"], params["retries"],
        module.check_mode)
    for record in result["devices"]:
        if record.get("warning"):
            module.warn(f"{record['device']}: {record['warning']}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
