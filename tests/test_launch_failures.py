"""A rank that dies without reporting is named with its exit code or signal, at once."""
import time
import warnings

import pytest

from dpo_lab.parallel import RankFailed, RankTimeout, launch
from tests import _fail_ranks, _ranks
from tests.test_launch import _no_rank_processes_left

pytestmark = pytest.mark.distributed


def _fails(fn, *args, world_size=2):
    with pytest.raises(RankFailed) as info:
        launch(fn, world_size, args=args, timeout=120)
    assert _no_rank_processes_left()
    return info.value


def test_exit_code_of_a_silently_dead_rank_beats_the_survivors_connection_reset():
    err = _fails(_fail_ranks.exit_on_rank, 1, 3)
    assert err.rank == 1 and err.exitcode == 3
    assert "died without reporting a result: exit code 3" in str(err)


def test_the_dead_rank_is_named_even_when_its_peers_errors_arrive_first():
    # rank 1 drops its connections 0.5 s before it exits: rank 0's "connection closed" error
    # reaches the launcher first, and must not be what gets reported
    err = _fails(_fail_ranks.slow_death_on_rank, 1, 3, 0.5)
    assert err.rank == 1 and "exit code 3" in str(err)
    assert "rank 0:" in str(err)  # the survivor's error stays visible, as a consequence


def test_a_killed_rank_is_named_with_its_signal():
    err = _fails(_fail_ranks.sigkill_on_rank, 1)
    assert err.rank == 1 and "killed by signal SIGKILL" in str(err)


def test_exit_0_without_a_report_is_an_error_not_a_timeout():
    t0 = time.monotonic()
    try:
        err = _fails(_fail_ranks.silent_exit_on_rank, 1)
    except RankTimeout:  # the bug: waited the whole 120 s for a rank that was long gone
        pytest.fail("a rank that exited 0 without reporting was only noticed at the timeout")
    assert err.rank == 1 and "exit code 0" in str(err)
    assert time.monotonic() - t0 < 100  # hang guard only; the real check is the error type


def test_a_raising_rank_is_still_named_by_its_traceback():
    err = _fails(_ranks.raise_on_rank, 1, world_size=3)
    assert err.rank == 1 and err.exitcode is None and "boom on rank 1" in str(err)


def _exit_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = launch(fn, 2, args=args, timeout=120)
    return out, [str(w.message) for w in caught if "exited with" in str(w.message)]


def test_finished_ranks_exit_with_code_0_every_time():
    for _ in range(3):
        out, bad_exits = _exit_warnings(_ranks.all_reduce_rank, 1)
        assert out == [(0, 2, 3.0), (1, 2, 3.0)] and bad_exits == []


def test_a_rank_that_aborts_at_exit_is_reported():
    out, bad_exits = _exit_warnings(_fail_ranks.abort_at_exit_on_rank, 1)
    assert out == [0, 1]
    assert bad_exits == ["rank 1 returned its result but then exited with killed by signal SIGABRT"]
