"""blkcache: drop and verify the page cache of a block device."""

import os
import shlex
import shutil
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

#: The setcap helper: csrc/blkcache-flush.c, installed inside the package as
#: blkcache/blkcache-flush.  These flags, exactly, and never setcap here: an
#: administrator grants the capability after installing (see README).
HELPER_SOURCE = os.path.join("csrc", "blkcache-flush.c")
HELPER_NAME = "blkcache-flush"
HELPER_CFLAGS = ["-O2", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2",
                 "-fstack-protector-strong", "-fPIE", "-pie", "-Wl,-z,relro,-z,now",
                 "-Wall", "-Wextra", "-Werror"]


class build_ext_with_helper(build_ext):
    """build_ext that also compiles the setcap helper into the package."""

    def helper_target(self):
        if self.inplace:
            package_dir = self.get_finalized_command("build_py").get_package_dir("blkcache")
            return os.path.join(HERE, package_dir, HELPER_NAME)
        return os.path.join(self.build_lib, "blkcache", HELPER_NAME)

    def build_helper(self):
        target = self.helper_target()
        source = os.path.join(HERE, HELPER_SOURCE)
        if not self.force and os.path.exists(target) and \
                os.path.getmtime(target) >= os.path.getmtime(source):
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("gcc") or "cc"]
        command = compiler + HELPER_CFLAGS + [source, "-o", target + ".tmp"]
        self.announce(" ".join(shlex.quote(arg) for arg in command), level=2)
        subprocess.run(command, check=True)
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)

    def run(self):
        super().run()
        self.build_helper()

    def get_outputs(self):
        return super().get_outputs() + [self.helper_target()]


#: status --prometheus (blkcache.integrations.prometheus): write_to_textfile's
#: temporary file beside the target.
PROMETHEUS_CLIENT = "prometheus-client>=0.12"


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
    packages=find_packages(include=["blkcache", "blkcache.*"]),
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "click>=8.0"],
    extras_require={
        "prometheus": [PROMETHEUS_CLIENT],
        # The fleet tests drive the real engines: ansible-core runs the
        # collection in ansible/, prometheus_client parses the metrics.
        "test": ["pytest>=7", "ansible-core>=2.14; python_version >= '3.9'", PROMETHEUS_CLIENT],
    },
    cffi_modules=["blkcache/_ffi_build.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_with_helper},
    entry_points={"console_scripts": ["blkcache = blkcache.cli:main"]},
    data_files=[("share/man/man8", ["man/blkcache.8", "man/blkcache-flush.8"])],
    zip_safe=False,
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Filesystems",
    ],
)
