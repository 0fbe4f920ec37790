"""Integrations: blkcache where fleets run it.

Each module here plugs the library (blkcache.api and the kernel views) into
one engine of the stack -- libvirt's hooks, Prometheus, the system-wide
installation of the setcap helper -- and holds no page-cache logic of its
own.  The command line exposes them as thin commands.
"""
