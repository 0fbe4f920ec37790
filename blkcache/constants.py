"""Facts shared by the library, the command line and the integrations.

Dependency-free (it imports only os), so any module, the command line's
start-up included, can import it for nothing.  A list of methods or
interfaces, or a default, is written here once and imported everywhere else.
"""

import os

#: Bytes in a page (ranges are widened to whole pages).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The largest offset or length: off_t is signed 64-bit.
MAX_SIZE = 2 ** 63 - 1

#: Kernel interfaces for residency: cachestat(2), falling back to mincore(2)
#: only where cachestat is missing ("auto").
INTERFACES = ("auto", "cachestat", "mincore")
#: Drop methods: "auto" picks ioctl, else helper, else fadvise.
METHODS = ("auto", "ioctl", "helper", "fadvise")

#: How many times a drop retries pages that survived (readahead in flight),
#: and the most a caller may ask for.
DEFAULT_RETRIES = 6
MAX_RETRIES = 20

#: At most this many devices in one multi-device call (API and command line).
MAX_TARGETS = 256
