"""ZeRO-1 and ZeRO-2 against the unsharded optimizer; memory counted from tensors vs formulas."""
import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.cost import FP32_ADAM, model_state_bytes
from dpo_lab.parallel.dp_training import max_abs_diff, train_single, train_strategies
from dpo_lab.parallel.zero import shard_range


def test_shard_range_covers_every_element_once():
    for numel in (0, 1, 5, 8, 1001):
        for n in (1, 2, 3, 4):
            pieces = [shard_range(numel, r, n)[:2] for r in range(n)]
            covered = [i for lo, hi in pieces for i in range(lo, hi)]
            assert covered == list(range(numel))


@pytest.mark.distributed
def test_zero1_zero2_equal_single_and_memory_follows_formula():
    ref = train_single(steps=3)
    res = launch(train_strategies, 4, kwargs=dict(strategies=("zero1", "zero2"), steps=3), timeout=300)
    psi = sum(p.numel() for p in ref.values())
    for rank in range(4):
        for stage, s in ((1, "zero1"), (2, "zero2")):
            assert max_abs_diff(res[rank][s]["params"], ref) < 1e-4, (rank, s)
            theory = model_state_bytes(psi, stage, 4, **FP32_ADAM)
            for part in ("params", "grads", "optimizer"):
                measured = res[rank][s]["memory"][part]
                assert measured == pytest.approx(theory[part], rel=0.01), (s, part)
    # ZeRO-2 sends 2Ψ·(n-1)/n: reduce-scatter + all-gather, like plain DP's all-reduce.
    assert res[0]["zero2"]["bytes_per_step"] == pytest.approx(2 * 3 / 4 * psi * 4, rel=0.01)
