"""Target.device is os.path.realpath of the path, also on the fast path for
nodes directly in /dev (no readlink of /proc/self/fd there)."""

import os
import uuid

import pytest

import blkcache
from blkcache import api


@pytest.fixture
def dev_symlink(loopdev):
    """/dev/blkcache-test-XXXX -> loopN (relative, like /dev/cdrom -> sr0); removed after."""
    link = f"/dev/blkcache-test-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.basename(loopdev), link)
    try:
        yield link
    finally:
        os.unlink(link)


def test_device_is_the_realpath(loopdev, dev_symlink, tmp_path):
    other = tmp_path / "elsewhere"
    os.symlink(dev_symlink, other)
    for path in (str(loopdev), dev_symlink, f"/dev/../dev/{os.path.basename(loopdev)}",
                 str(other), f"/dev//{os.path.basename(loopdev)}"):
        with api.Target(path) as target:
            assert target.device == os.path.realpath(path) == str(loopdev), path
            assert target.kind == "block" and target.size == 64 << 20
            assert target.rdev == (os.major(os.stat(loopdev).st_rdev),
                                   os.minor(os.stat(loopdev).st_rdev))
        assert api.status(path).device == str(loopdev)


def test_a_regular_file(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(b"x" * 10000)
    with api.Target(str(image)) as target:
        assert (target.kind, target.size, target.rdev) == ("file", 10000, None)
        assert target.device == str(image)


def test_a_symlink_in_dev_to_a_refused_node_is_refused(dev_symlink):
    """The fast path opens /dev/NAME without following it; a symlink there is
    followed and type-checked like any path."""
    os.unlink(dev_symlink)
    os.symlink("null", dev_symlink)
    with pytest.raises(blkcache.UnsupportedFileError, match="character device"):
        api.Target(dev_symlink)
