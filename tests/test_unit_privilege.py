"""blkcache.privilege: decoding security.capability (struct vfs_cap_data) and
naming capabilities, without any file or privilege.  Pure: any user."""

import struct

import pytest

from blkcache import privilege

V1, V2, V3 = 0x01000000, 0x02000000, 0x03000000
EFFECTIVE = 0x000001
CAP_FOWNER, CAP_SYS_ADMIN, CAP_BPF = 3, 21, 39


def xattr(magic, permitted=0, inheritable=0, words=2, rootid=None):
    data = struct.pack("<I", magic)
    for i in range(words):
        data += struct.pack("<II", permitted >> (32 * i) & 0xFFFFFFFF,
                            inheritable >> (32 * i) & 0xFFFFFFFF)
    return data + (struct.pack("<I", rootid) if rootid is not None else b"")


def test_what_setcap_writes_for_the_helper():
    """setcap cap_sys_admin+p: version 2, permitted only, not effective."""
    caps = privilege.decode_file_caps(xattr(V2, 1 << CAP_SYS_ADMIN))
    assert (caps.version, caps.effective, caps.rootid) == (2, False, None)
    assert caps.has(CAP_SYS_ADMIN) and not caps.has(CAP_FOWNER)
    assert caps.text() == "cap_sys_admin=p"


def test_effective_inheritable_and_the_second_word():
    caps = privilege.decode_file_caps(xattr(V2 | EFFECTIVE, 1 << CAP_BPF | 1 << CAP_FOWNER,
                                            1 << CAP_SYS_ADMIN))
    assert caps.effective and caps.has(CAP_BPF) and caps.has(CAP_FOWNER)
    assert caps.text() == "cap_fowner,cap_bpf=ep cap_sys_admin+i"


def test_version_1_has_one_word_and_version_3_a_rootid():
    caps = privilege.decode_file_caps(xattr(V1, 1 << CAP_SYS_ADMIN, words=1))
    assert (caps.version, caps.permitted) == (1, 1 << CAP_SYS_ADMIN)
    caps = privilege.decode_file_caps(xattr(V3, 1 << CAP_SYS_ADMIN, rootid=100000))
    assert (caps.version, caps.rootid) == (3, 100000)
    assert caps.text() == "cap_sys_admin=p [rootid=100000]"
    assert privilege.decode_file_caps(xattr(V2)).text() == "="


@pytest.mark.parametrize("data,message", [
    (b"", "too short (0 bytes)"),
    (b"\x00\x00\x00", "too short (3 bytes)"),
    (xattr(0x04000000), "unknown security.capability revision 4"),
    (xattr(V2, words=1), "version 2 must be 20 bytes, not 12"),
    (xattr(V3, 1), "version 3 must be 24 bytes, not 20"),
    (xattr(V1, 1, words=2), "version 1 must be 12 bytes, not 20"),
])
def test_garbage_is_refused(data, message):
    with pytest.raises(ValueError) as info:
        privilege.decode_file_caps(data)
    assert message in str(info.value)


def test_cap_names():
    assert privilege.cap_names(0) == []
    assert privilege.cap_names(1 << CAP_SYS_ADMIN | 1) == ["cap_chown", "cap_sys_admin"]
    assert privilege.cap_names(1 << 63) == ["cap_63"]     # newer than this table
