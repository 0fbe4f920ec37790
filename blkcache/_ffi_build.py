"""cffi builder for blkcache._native (API mode, out of line).

The cdef is the header csrc/blkcache.h itself, so the C declarations live in
one place; the C compiler checks them against csrc/blkcache.c.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.normpath(os.path.join(HERE, os.pardir, "csrc"))

ffibuilder = FFI()
with open(os.path.join(CSRC, "blkcache.h"), encoding="utf-8") as header:
    ffibuilder.cdef(header.read())

ffibuilder.set_source(
    "blkcache._native",
    '#include <stdint.h>\n#include "blkcache.h"\n',
    sources=[os.path.relpath(os.path.join(CSRC, "blkcache.c"))],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-D_FORTIFY_SOURCE=2",
                        "-fstack-protector-strong"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
