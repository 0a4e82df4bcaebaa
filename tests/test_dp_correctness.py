"""DataParallel when ranks differ: a parameter used on some ranks only, gradient accumulation.

Gloo and nccl pair the k-th collective of each rank; if a rank launches its all-reduces in another
order the gradients are mixed up silently. References: one process on the whole batch (plain torch)
and torch's DDP(find_unused_parameters=True).
"""
import pytest

from dpo_lab.parallel import RankFailed, launch
from dpo_lab.parallel.dp_training import max_abs_diff
from tests import _dp_ranks as R

pytestmark = pytest.mark.distributed

# uses[step][rank]: the branch runs on rank 0 only, then on rank 1 only, then nowhere.
USES = [[True, False], [False, True], [False, False]]


def test_parameter_used_on_some_ranks_only_matches_single_process_and_ddp():
    ref = R.branchy_single(USES)
    ref2 = R.branchy_single(USES[:2])  # no step where nobody uses the branch
    # find_unused_parameters=True: every step, as DDP; False: a zero gradient for a parameter no
    # rank used (AdamW's decay would move it), so only the steps where some rank uses it.
    jobs = [("dp_unused", USES), ("dp_bucketed_unused", USES), ("ddp", USES),
            ("dp", USES[:2]), ("dp_bucketed", USES[:2]), ("zero2", USES[:2])]
    res = launch(R.branchy_train, 2, args=(jobs,), timeout=60)
    for rank in range(2):
        for (s, uses), got in zip(jobs, res[rank]):
            assert max_abs_diff(got, ref if len(uses) == 3 else ref2) < 1e-5, (rank, s)
        assert max_abs_diff(res[rank][0], res[rank][2]) < 1e-5  # ours vs DDP
    assert max_abs_diff(res[0][0], res[1][0]) == 0  # the replicas are identical


def test_gradient_accumulation_with_no_sync_matches_single_process_and_ddp():
    ref = R.accumulate_single(2)
    strategies = ("dp", "dp_bucketed", "ddp", "zero2")
    res = launch(R.accumulate_train, 2, args=(strategies,), timeout=60)
    for rank in range(2):
        for s in strategies:
            assert max_abs_diff(res[rank][s], ref) < 1e-5, (rank, s)


@pytest.mark.parametrize("strategy,fix", [("dp", "no_sync"), ("dp_bucketed", "no_sync"),
                                          ("zero2", "after each backward")])
def test_second_backward_before_the_sync_raises(strategy, fix):
    with pytest.raises(RankFailed, match=rf"(?s)parameter '.*' received another gradient.*{fix}"):
        launch(R.two_backwards_without_sync, 2, args=(strategy,), timeout=60)
