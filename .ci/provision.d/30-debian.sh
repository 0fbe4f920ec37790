# The Debian package's build and its test (tests/test_debian.py), and the
# system python3 that tests/test_install_helper.py builds a wheel with.
ci_apt dpkg-dev debhelper dh-python python3-all-dev python3-setuptools python3-cffi \
    python3-click python3-wheel python3-venv libcap2-bin lintian build-essential
