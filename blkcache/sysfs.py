"""Block devices as sysfs and /dev name them: read-only lookups.

/sys/class/block/NAME/dev holds "MAJ:MIN"; /sys/dev/block/MAJ:MIN links to the
device's directory; /dev/NAME is its node (when udev or devtmpfs made one).
Every function takes ``sysfs`` (default /sys) so tests can hand it a tree.
"""

import os
import stat

SYSFS = "/sys"


def read(path):
    """The stripped ASCII text of a sysfs attribute, or None."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def listdir(path):
    """Sorted entries of a sysfs directory; [] when there is none."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def rdev_of(name, sysfs=SYSFS):
    """The device number of block device NAME (loop0, dm-0), or None."""
    text = read(f"{sysfs}/class/block/{name}/dev")
    if not text or ":" not in text:
        return None
    major, minor = text.split(":", 1)
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def name_of(rdev, sysfs=SYSFS):
    """The sysfs name (loop0, loop0p1, dm-0) of block device rdev, or None."""
    link = dev_dir(rdev, sysfs)
    if not os.path.exists(link):
        return None
    return os.path.basename(os.path.realpath(link))


def dev_dir(rdev, sysfs=SYSFS):
    """/sys/dev/block/MAJ:MIN: the directory of block device rdev."""
    return f"{sysfs}/dev/block/{os.major(rdev)}:{os.minor(rdev)}"


def dev_path(name, rdev=None):
    """/dev/NAME if that node is the device (by st_rdev when known), else None."""
    for candidate in (f"/dev/{name}", f"/dev/{name.replace('!', '/')}"):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (rdev is None or st.st_rdev == rdev):
            return candidate
    if rdev is not None:
        candidate = f"/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        try:
            st = os.stat(candidate)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return os.path.realpath(candidate)
        except OSError:
            pass
    return None
