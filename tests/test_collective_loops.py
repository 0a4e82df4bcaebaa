"""Loops that repeat collectives decide to stop together, even when one rank is much slower.

A rank that stops on its own clock leaves the loop for the next collective while the others wait
in the loop's barrier: both wait forever (issue 9). These tests slow one rank down on purpose.
"""
import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.demos import time_all_reduce
from tests._ranks import time_all_reduce_one_slow_rank

SIZES = [1024, 4096]
VARIANTS = ("native", "ring")
DELAY_S = 0.1  # the slow rank alone spends this per repetition, over the budget after 1


@pytest.mark.distributed
@pytest.mark.parametrize("world_size,slow_rank", [(2, 1), (3, 0)])
def test_one_slow_rank_all_ranks_repeat_the_same_number_of_times(world_size, slow_rank):
    # 60 s is only a hang guard: without a collective stop decision this deadlocks.
    out = launch(time_all_reduce_one_slow_rank, world_size,
                 args=(slow_rank, DELAY_S, SIZES, VARIANTS, 20, DELAY_S / 2), timeout=60)
    # The slowest rank's clock decides: over budget after 1 repetition, and 2 is the minimum.
    # So every rank runs 1 warm-up + 2 timed repetitions per size, whatever the machine's load.
    for rank, calls, _ in out:
        assert calls == {v: len(SIZES) * (1 + 2) for v in VARIANTS}, f"rank {rank}: {calls}"
    # Every rank reports the slowest rank's time, which includes its delay.
    times = [t for _, _, t in out]
    assert all(t == times[0] for t in times)
    assert all(sec >= DELAY_S for sec in times[0].values()), times[0]


@pytest.mark.distributed
def test_within_budget_every_rank_repeats_repeat_times():
    out = launch(time_all_reduce_one_slow_rank, 2, args=(-1, 0.0, [1024], VARIANTS, 4, 1e9), timeout=60)
    for rank, calls, times in out:
        assert calls == {v: 1 + 4 for v in VARIANTS}, f"rank {rank}: {calls}"
        assert all(sec > 0 for sec in times.values())


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="'gossip'"):
        time_all_reduce([1024], ("native", "gossip"))
