"""vocab_parallel_cross_entropy against F.cross_entropy on the full logits: ignore_index,
reductions, all rows ignored, and out-of-range targets (an error on every rank, no hang)."""
import pytest

from dpo_lab.parallel import launch
from tests import _dp_ranks as R

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_equals_torch_cross_entropy_with_ignore_index(world_size):
    for rank_result in launch(R.vocab_ce_against_torch, world_size, timeout=60):
        for (case, reduction), (dloss, dgrad, nan, ref_nan, gnan, ref_gnan) in rank_result.items():
            assert dloss < 1e-5 and dgrad < 1e-6, (case, reduction, dloss, dgrad)
            assert (nan, gnan) == (ref_nan, ref_gnan), (case, reduction)  # nan where torch has nan
        assert rank_result[("all_ignored", "mean")][2]  # 0 rows / 0 rows: nan, as torch
        assert not rank_result[("mixed", "mean")][2]


def test_out_of_range_targets_raise_on_every_rank():
    for rank, msgs in enumerate(launch(R.vocab_ce_bad_targets, 2, timeout=60)):
        assert f"[{R.VOCAB}]" in msgs[0] and f"vocab size {R.VOCAB}" in msgs[0]
        assert "[-5]" in msgs[1]
        # one rank's bad target: both ranks raise (the other would otherwise wait in an all-reduce)
        assert msgs[2] is not None and ("[99]" in msgs[2] if rank == 1 else "another rank" in msgs[2])
        assert msgs[3] is None  # -100 is not out of range
