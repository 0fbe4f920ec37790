# libvirt and QEMU for tests/test_libvirt.py: the tests start their own private
# libvirtd/virtlogd (no systemd here) and stop them; nothing is started here.
# About 25 s on a machine without them (Debian 12: libvirt 9.0, QEMU 7.2).
ci_apt libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu qemu-system-x86
