#!/usr/bin/python
# Copyright: blkcache maintainers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module blkcache.blkcache.page_cache_info: page-cache status of devices."""

DOCUMENTATION = r"""
---
module: page_cache_info
short_description: Show how much of block devices is in the page cache
version_added: "0.1.0"
description:
  - Reports, for each device, the pages of a range that are cached, dirty and under
    write-back, the size of the device, and whether the kernel told (RV(devices[].exact)),
    as C(blkcache status --json) does.
  - Never changes anything; runs in check mode as in a normal run.
  - A device the kernel will not report to this user is not a failure; its counts are
    null and RV(devices[].exact) is false.
  - The module runs the blkcache Python API on the managed host.
options:
  device:
    description:
      - Block devices (or regular files) to report.
      - A string is one device, unless it holds commas (Ansible splits a string at commas);
        give such a path in a list.
    type: list
    elements: str
    required: true
    aliases: [devices]
notes:
  - Counts are a reading at one instant; the kernel may reclaim pages at any moment.
  - "Exit codes in RV(rc) on failure: 2 bad input (path, file type, range), 5 failure."
seealso:
  - module: blkcache.blkcache.page_cache
author:
  - blkcache maintainers
extends_documentation_fragment:
  - blkcache.blkcache.page_cache
"""

EXAMPLES = r"""
- name: Read the page cache of the volumes
  blkcache.blkcache.page_cache_info:
    device:
      - /dev/archip0
      - /dev/archip1
  register: cache

- name: Show what is cached
  ansible.builtin.debug:
    msg: "{{ item.path }}: {{ item.cached_bytes }} bytes cached, {{ item.dirty }} dirty pages"
  loop: "{{ cache.devices }}"
"""

RETURN = r"""
rc:
  description: The exit code the blkcache command would give on failure (0 on success).
  returned: when blkcache could be imported
  type: int
  sample: 0
msg:
  description: One line saying what failed.
  returned: failure
  type: str
  sample: "/dev/nosuch: No such file or directory"
devices:
  description: The status of each device, in the order given.
  returned: success
  type: list
  elements: dict
  contains:
    path:
      description: The path as given.
      type: str
      sample: /dev/archip0
    device:
      description: The canonical path of what was opened.
      type: str
      sample: /dev/loop1
    kind:
      description: V(block) or V(file).
      type: str
      sample: block
    size:
      description: Size of the device in bytes.
      type: int
      sample: 268435456
    page_size:
      description: Page size in bytes.
      type: int
      sample: 4096
    offset:
      description: Start of the range (page aligned).
      type: int
      sample: 0
    length:
      description: Length of the range in bytes (whole pages).
      type: int
      sample: 268435456
    pages:
      description: Pages in the range.
      type: int
      sample: 65536
    cached:
      description: Pages cached, null when the kernel will not tell.
      type: int
      sample: 17280
    cached_bytes:
      description: Bytes cached, null when the kernel will not tell.
      type: int
      sample: 70778880
    dirty:
      description: Dirty pages, null when the kernel does not tell.
      type: int
      sample: 0
    writeback:
      description: Pages under write-back, null when the kernel does not tell.
      type: int
      sample: 0
    evicted:
      description: Pages evicted from the cache (cachestat), else null.
      type: int
    recently_evicted:
      description: Pages evicted recently (cachestat), else null.
      type: int
    beyond_end:
      description: Pages cached past the end of a device that shrank (counted above).
      type: int
    interface:
      description: V(cachestat), V(mincore) or V(none).
      type: str
      sample: cachestat
    exact:
      description: False when the kernel will not tell this user (see RV(devices[].reason)).
      type: bool
      sample: true
    reason:
      description: Why the kernel does not tell, else null.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.blkcache.blkcache.plugins.module_utils.blkcache import (  # noqa: E402
    call,
)

ARGUMENT_SPEC = dict(
    device=dict(type="list", elements="str", required=True, aliases=["devices"]),
    offset=dict(type="str"),
    length=dict(type="str"),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    result = call(module, "info", params["device"], params["offset"], params["length"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
