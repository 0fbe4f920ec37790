# Copyright: blkcache maintainers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""What the modules page_cache and page_cache_info document alike: the range
options, the requirement on the managed host and the attributes."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  offset:
    description:
      - Start of the range in bytes, with an optional K, M, G or T suffix (rounded down to
        a page). Default is the start of the device.
    type: str
  length:
    description:
      - Length of the range in bytes, with an optional K, M, G or T suffix (rounded up to a
        page). Default is to the end of the device.
    type: str
requirements:
  - The blkcache Python package, the same version as this collection, installed for the
    Python interpreter Ansible uses on the managed host (C(ansible_python_interpreter)).
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without
      modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in
      check_mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
"""
