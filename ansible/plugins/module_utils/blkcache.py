# Copyright: blkcache maintainers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""What the modules page_cache and page_cache_info do alike: call blkcache's
Python API on the managed host and turn its failure into one msg and rc."""

import traceback

from ansible.module_utils.basic import missing_required_lib

try:
    from blkcache.integrations import ansible as blkcache_ansible
except ImportError:
    blkcache_ansible = None
    IMPORT_ERROR = traceback.format_exc()
else:
    IMPORT_ERROR = None


def call(module, function, *args):
    """The result of blkcache.integrations.ansible.FUNCTION(*args); on a
    failure, fail the module with blkcache's one-line message and exit code."""
    if blkcache_ansible is None:
        module.fail_json(msg=missing_required_lib("blkcache"), exception=IMPORT_ERROR)
    failure = None
    try:
        return getattr(blkcache_ansible, function)(*args)
    except blkcache_ansible.Failure as exc:
        failure = exc
    # Outside the handler: no traceback in the result.
    module.fail_json(**failure.to_dict())
