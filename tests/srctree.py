"""A clean copy of the source tree, as a fresh clone would have it.

Builds (a wheel, a Debian package) start from this copy, never from the
checkout: a developer's checkout may hold build artefacts (build/,
blkcache/_native*.so, blkcache/blkcache-flush, *.egg-info, debian/blkcache/)
that must not reach what is built.
"""

import os
import shutil
import subprocess

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What a checkout may hold that a clone does not (used without git).
ARTEFACTS = ("build", "dist", ".pybuild", "*.egg-info", "__pycache__", "*.pyc", "*.so",
             "*.o", "_native.c", "blkcache-flush", ".git", ".pytest_cache")
#: Debian build results, by directory (debian/blkcache is not blkcache/).
DEBIAN_ARTEFACTS = ("blkcache", ".debhelper", "files", "debhelper-build-stamp")


def _ignore(directory, names):
    ignored = set(shutil.ignore_patterns(*ARTEFACTS)(directory, names))
    if os.path.basename(directory) == "debian":
        ignored.update(n for n in names if n in DEBIAN_ARTEFACTS or n.endswith(
            (".substvars", ".debhelper", ".log")))
    return ignored


def _files_in_git():
    """The tracked and untracked-but-not-ignored files, or None without git."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(SOURCE, ".git")):
        return None
    proc = subprocess.run(["git", "-C", SOURCE, "ls-files", "-z", "--cached", "--others",
                           "--exclude-standard"], capture_output=True, check=False)
    if proc.returncode != 0:
        return None
    names = [n for n in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
    return [n for n in names if os.path.lexists(os.path.join(SOURCE, n))]


def clean_copy(destination):
    """Copy the source tree to ``destination`` (created), without build artefacts."""
    files = _files_in_git()
    if files is None:
        shutil.copytree(SOURCE, destination, symlinks=True, ignore=_ignore)
        return destination
    for name in files:
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(SOURCE, name), target, follow_symlinks=False)
    return destination
