# Tools the tests need (tests/needs.py: a missing one fails under CI):
#   readelf (binutils)        the helper's hardening        tests/test_helper.py
#   strace                    capabilities around the ioctl tests/test_helper.py
#   unshare, setpriv          no /proc; running as nobody   tests/test_badinput.py, unprivileged.py
#   setcap (libcap2-bin)      the helper's file capability  tests/unprivileged.py
#   mkfs.ext4 (e2fsprogs)     mounted file systems          tests/test_holders.py, test_faults.py
#   gcc, libasan8, libubsan1  sanitizers, -fanalyzer        tests/test_native_hygiene.py
#   python3.11                an interpreter nobody may run  tests/unprivileged.py
ci_apt binutils strace util-linux libcap2-bin e2fsprogs gcc libc6-dev libasan8 libubsan1 \
    python3.11
