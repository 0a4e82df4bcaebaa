"""Hand-written FSDP (ZeRO-3) against single-process training and torch's fully_shard (FSDP2)."""
import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.cost import FP32_ADAM, model_state_bytes
from dpo_lab.parallel.dp_training import max_abs_diff, train_single, train_strategies

pytestmark = pytest.mark.distributed


def test_fsdp_equals_single_and_fsdp2():
    ref = train_single(steps=3)
    res = launch(train_strategies, 2, kwargs=dict(strategies=("fsdp", "fsdp_bf16", "fsdp2"), steps=3),
                 timeout=300)
    psi = sum(p.numel() for p in ref.values())
    for rank in range(2):
        fsdp = res[rank]["fsdp"]
        assert max_abs_diff(fsdp["params"], ref) < 1e-4
        assert max_abs_diff(fsdp["params"], res[rank]["fsdp2"]["params"]) < 1e-4
        # bf16 compute and communication: close, not equal; master weights stay fp32.
        bf16 = max_abs_diff(res[rank]["fsdp_bf16"]["params"], ref)
        assert 1e-6 < bf16 < 0.1
        assert all(v.dtype.is_floating_point and v.element_size() == 4 for v in fsdp["params"].values())
        theory = model_state_bytes(psi, 3, 2, **FP32_ADAM)
        for part in ("params", "grads", "optimizer"):
            assert fsdp["memory"][part] == pytest.approx(theory[part], rel=0.01), part
    # 3Ψ(n-1)/n per step: all-gather forward and backward, reduce-scatter; bf16 halves it.
    assert res[0]["fsdp"]["bytes_per_step"] == pytest.approx(3 * 1 / 2 * psi * 4, rel=0.01)
    assert res[0]["fsdp_bf16"]["bytes_per_step"] == pytest.approx(3 * 1 / 2 * psi * 2, rel=0.01)


def test_fsdp_with_tied_and_frozen_parameters():
    ref = train_single(steps=2, tied=True)
    res = launch(train_strategies, 2, kwargs=dict(strategies=("fsdp",), steps=2, tied=True), timeout=240)
    assert max_abs_diff(res[0]["fsdp"]["params"], ref) < 1e-4
