"""Hook scripts shipped with blkcache (package data, printed by `blkcache hook`)."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))

#: kind -> file name in this directory
SCRIPTS = {"libvirt": "qemu"}


def script_path(kind):
    """Path of the installed hook script for ``kind`` (e.g. "libvirt")."""
    return os.path.join(HERE, SCRIPTS[kind])


def script_text(kind):
    with open(script_path(kind), encoding="utf-8") as f:
        return f.read()
