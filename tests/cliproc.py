"""Run the blkcache command as a subprocess and check the error contract."""

import os
import subprocess
import sys

# The package under test, wherever it was imported from (installed on CI).
import blkcache

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(blkcache.__file__)))


def _arg(arg):
    return arg if isinstance(arg, (str, bytes)) else str(arg)


def env():
    """The environment for a child: it must import the same blkcache."""
    out = dict(os.environ)
    path = out.get("PYTHONPATH", "")
    out["PYTHONPATH"] = PKG_PARENT + (os.pathsep + path if path else "")
    out["LC_ALL"] = "C.UTF-8"
    return out


# `python -m blkcache`, reading the sysfs tree named by its first argument.
_SYSFS_MAIN = ("import sys\n"
               "import blkcache.stack\n"
               "blkcache.stack.SYSFS = sys.argv.pop(1)\n"
               "from blkcache.cli import main\n"
               "main(sys.argv[1:])\n")


def run(*args, timeout=60, stdin=subprocess.DEVNULL, sysfs=None):
    """(returncode, stdout, stderr) of `python -m blkcache ARGS` (str, bytes or
    path-like args); the one way the tests run the command line.  ``sysfs``:
    a hand-built tree the command reads instead of /sys (blkcache.stack)."""
    command = [sys.executable, "-m", "blkcache"] if sysfs is None else \
        [sys.executable, "-c", _SYSFS_MAIN, str(sysfs)]
    proc = subprocess.run([*command, *map(_arg, args)], stdin=stdin,
                          capture_output=True, timeout=timeout, env=env())
    out = proc.stdout.decode("utf-8", "surrogateescape")
    err = proc.stderr.decode("utf-8", "surrogateescape")
    assert "Traceback" not in err and "Traceback" not in out, err
    return proc.returncode, out, err


def completed(*args, timeout=60, stdin=subprocess.DEVNULL, sysfs=None):
    """run(), as a subprocess.CompletedProcess (returncode, stdout, stderr)."""
    code, out, err = run(*args, timeout=timeout, stdin=stdin, sysfs=sysfs)
    return subprocess.CompletedProcess(["blkcache", *args], code, out, err)


def start(*args, **popen_args):
    """`python -m blkcache ARGS` started, not waited for: a Popen (text pipes)."""
    return subprocess.Popen([sys.executable, "-m", "blkcache", *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_args)


def one_error_line(err):
    """The single 'blkcache: ...' line of stderr (asserts there is exactly one)."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("blkcache: "), lines[0]
    assert err.endswith("\n")
    return lines[0]


def run_many(argvs, timeout=60, workers=4):
    """run() each argv, a few at a time; the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda argv: run(*argv, timeout=timeout), argvs))


def umount(where, tries=50):
    """umount, retrying while it is briefly busy (a loop device just detached).

    Still busy after that (a failed test left a descriptor or loop device on
    it): unmount it lazily, so that nothing stays mounted once the last user
    goes, and raise, so that the leak is reported."""
    import time

    for _ in range(tries):
        proc = subprocess.run(["umount", where], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", where], capture_output=True, check=False)
    raise RuntimeError(f"umount {where}: {proc.stderr.strip()} (unmounted lazily)")
