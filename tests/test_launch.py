import os
import threading
import time

import psutil
import pytest
import torch.distributed as dist

from dpo_lab.parallel import RankFailed, RankTimeout, launch
from tests import _ranks

pytestmark = pytest.mark.distributed


def _no_rank_processes_left():
    """Every descendant is gone except multiprocessing's own helpers (the forkserver that ranks fork
    from, the resource tracker), which are our direct children and outlive a launch on purpose."""
    me = os.getpid()

    def helper(k):
        return k.ppid() == me and any(h in " ".join(k.cmdline()) for h in ("forkserver", "resource_tracker"))
    try:
        kids = psutil.Process().children(recursive=True)
        alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE and not helper(k)]
    except psutil.NoSuchProcess:  # one ended while we looked: look again
        return _no_rank_processes_left()
    return not alive


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_returns_each_ranks_value(world_size):
    out = launch(_ranks.all_reduce_rank, world_size, args=(10,), timeout=60)
    expected = sum(r + 10 for r in range(world_size))
    assert out == [(r, world_size, float(expected)) for r in range(world_size)]


def test_failing_rank_names_rank_and_traceback_quickly():
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        launch(_ranks.raise_on_rank, 3, args=(1,), timeout=120)
    assert time.monotonic() - t0 < 30  # not the 120 s timeout
    assert info.value.rank == 1
    assert "boom on rank 1" in str(info.value) and "Traceback" in str(info.value)
    assert _no_rank_processes_left()


def test_hanging_rank_times_out_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        launch(_ranks.hang, 2, args=(600,), timeout=4)
    assert time.monotonic() - t0 < 30
    assert info.value.pending == [0, 1]
    assert _no_rank_processes_left()


def test_two_launches_at_once_pick_different_ports():
    results, errors = {}, []

    def go(key, x):
        try:
            results[key] = launch(_ranks.all_reduce_rank, 2, args=(x,), timeout=60)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(k, k * 100)) for k in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert results[1][0][2] == 201.0 and results[2][0][2] == 401.0


def test_bad_world_size_is_rejected():
    with pytest.raises(ValueError, match="world_size"):
        launch(_ranks.hang, 0)


def test_functions_defined_in_a_notebook_cell_run_on_the_ranks():
    """A notebook cell's function lives in __main__, which the ranks cannot import; lambdas and
    closures cannot be pickled by reference at all. The launcher sends all three by value."""
    cell = {"__name__": "__main__"}
    exec("import torch.distributed as dist\n"
         "def rank_times(k):\n"
         "    return dist.get_rank() * k\n", cell)
    assert cell["rank_times"].__module__ == "__main__"
    assert launch(cell["rank_times"], 2, args=(7,), timeout=60) == [0, 7]
    offset = 100

    def closure():
        import torch.distributed as dist
        return dist.get_rank() + offset
    assert launch(closure, 2, timeout=60) == [100, 101]
    # a student's function passed as an argument to a rank function of an importable module
    assert launch(_ranks.call_with_rank, 2, args=(lambda r: r * r + 1,), timeout=60) == [1, 2]


def _rank_only():
    return dist.get_rank()


def test_ranks_that_need_no_collective_never_race_the_handshake():
    """gloo's connectFullMesh can return on one rank before its peer has finished the handshake; a
    rank with nothing to communicate then exited and its peer failed with "Connection closed by
    peer" (7 in 300 launches on a loaded 2-core machine; this loop catches it only now and then).
    The launcher holds the ranks at a barrier."""
    for _ in range(50):
        assert launch(_rank_only, 2, timeout=60) == [0, 1]
