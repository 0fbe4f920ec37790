"""blkcache: drop and verify the page cache of a block device."""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    scope = {}
    with open(os.path.join(HERE, "blkcache", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


setup(
    name="blkcache",
    version=read_version(),
    description="Drop and verify the page cache of block devices (live-migration safety)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.8",
    packages=["blkcache", "blkcache.hooks"],
    package_data={"blkcache.hooks": ["qemu"]},
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "click>=8.0"],
    extras_require={"test": ["pytest>=7"]},
    cffi_modules=["blkcache/_ffi_build.py:ffibuilder"],
    entry_points={"console_scripts": ["blkcache = blkcache.cli:main"]},
    data_files=[("share/man/man8", ["man/blkcache.8"])],
    zip_safe=False,
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Filesystems",
    ],
)
