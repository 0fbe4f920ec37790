"""Skip a test whose tool or engine is missing, or fail it where it is required.

A test that needs something this machine may lack (strace, libvirt, dpkg
tools, node_exporter...) calls ``missing("strace is not installed")``.  On a
developer's machine that is a skip with the reason.  Where everything is
provisioned (``.ci/run`` sets BLKCACHE_REQUIRE_ALL=1) it is a failure: a
silently skipped suite is a suite that tests nothing.
"""

import os
import shutil

import pytest

REQUIRED = os.environ.get("BLKCACHE_REQUIRE_ALL") == "1"


def missing(reason):
    if REQUIRED:
        pytest.fail(f"BLKCACHE_REQUIRE_ALL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def need_tool(name, package=None):
    """The path of tool ``name``, or skip/fail naming the package to install."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed" + (f" (apt-get install {package})" if package else ""))
    return path
