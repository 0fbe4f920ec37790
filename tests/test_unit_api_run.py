"""blkcache.api.run: several devices the way the command line runs them, on
regular files of our own (any user): everything is checked before anything is
done, one device's error is its own outcome, the codes combine."""

import errno

from blkcache import api, exitcodes
from blkcache.cli import render
from blkcache.errors import MissingNodeError, UsageError

from test_unit_stack import GHOST_MAJOR, Tree, a_block_node, ghost


def files(tmp_path, *names):
    out = []
    for name in names:
        path = tmp_path / name
        path.write_bytes(b"x" * 8192)
        out.append(str(path))
    return out


def test_each_device_gets_its_outcome_in_order(tmp_path):
    paths = files(tmp_path, "a", "b")
    reported = []
    batch = api.run(paths, lambda t: t.verify(), report=reported.append)
    assert [o.path for o in batch.outcomes] == paths
    assert reported == batch.outcomes
    assert all(o.error is None and o.result.verdict in ("clean", "resident")
               and o.code == exitcodes.for_verdict(o.result.verdict) for o in batch.outcomes)
    assert batch.results == [o.result for o in batch.outcomes]
    assert batch.code == exitcodes.combine(o.code for o in batch.outcomes)


def test_bad_input_stops_before_anything_is_done(tmp_path):
    paths = files(tmp_path, "a", "b")
    done = []
    for bad, code in ((str(tmp_path / "missing"), exitcodes.USAGE),
                      (str(tmp_path), exitcodes.USAGE)):          # a directory
        batch = api.run([paths[0], bad, paths[1]], done.append)
        assert done == []
        [outcome] = batch.outcomes
        assert (outcome.path, outcome.result, outcome.code, batch.code) == \
            (bad, None, code, code)
    batch = api.run(paths * (api.MAX_TARGETS // 2 + 1), done.append)
    assert done == [] and batch.code == exitcodes.USAGE
    assert isinstance(batch.outcomes[0].error, UsageError)


def test_one_failure_does_not_stop_the_others(tmp_path):
    paths = files(tmp_path, "a", "b", "c")

    def action(target):
        if target.path == paths[1]:
            raise OSError(errno.EIO, "Input/output error", target.path)
        return target.status()

    batch = api.run(paths, action)
    assert [o.code for o in batch.outcomes] == [0, exitcodes.FAILURE, 0]
    assert batch.outcomes[1].error.errno == errno.EIO
    assert batch.code == exitcodes.SOME_FAILED
    assert len(batch.results) == 2
    batch = api.run(paths[1:2], action)
    assert batch.code == exitcodes.FAILURE            # one device: its own code


def test_recursive_on_files_is_the_files(tmp_path):
    paths = files(tmp_path, "a")
    assert api.expand(paths) == paths
    batch = api.run(paths, lambda t: t.status(), recursive=True)
    assert [o.path for o in batch.outcomes] == paths and batch.code == exitcodes.OK


def test_a_related_device_without_a_node_is_an_error_of_its_own(tmp_path):
    path, rdev = a_block_node()
    tree = Tree(tmp_path)
    tree.add("top\x1b", rdev, slaves=["ghost1"])
    tree.add("ghost1", ghost(1))
    first, second = api.expand([path], sysfs=str(tmp_path))
    assert first == path and isinstance(second, MissingNodeError)
    assert exitcodes.for_error(second) == exitcodes.FAILURE
    assert render.describe(second) == (f"ghost1 ({GHOST_MAJOR}:1, slave of top\\x1b): no "
                                       "device node in /dev; not handled")
