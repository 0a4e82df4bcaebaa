"""Our DataParallel against single-process training and torch's DistributedDataParallel."""
import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.dp_training import max_abs_diff, train_single, train_strategies

pytestmark = pytest.mark.distributed


def test_dp_equals_single_and_ddp_with_and_without_buckets():
    ref = train_single(steps=3)
    res = launch(train_strategies, 2, kwargs=dict(strategies=("dp", "dp_bucketed", "ddp"), steps=3),
                 timeout=240)
    for rank in range(2):
        for s in ("dp", "dp_bucketed", "ddp"):
            assert max_abs_diff(res[rank][s]["params"], ref) < 1e-4, (rank, s)
        assert max_abs_diff(res[rank]["dp"]["params"], res[rank]["ddp"]["params"]) < 1e-5
    psi = sum(p.numel() for p in ref.values())
    assert res[0]["dp"]["bytes_per_step"] == 2 * (2 - 1) / 2 * psi * 4  # ring all-reduce volume


def test_tied_and_frozen_parameters():
    ref = train_single(steps=2, tied=True)
    res = launch(train_strategies, 2, kwargs=dict(strategies=("dp", "dp_bucketed"), steps=2, tied=True),
                 timeout=240)
    assert "frozen" in ref and "head.weight" not in ref  # tied: one tensor, under its first name
    for s in ("dp", "dp_bucketed"):
        assert max_abs_diff(res[1][s]["params"], ref) < 1e-4
        assert res[1][s]["params"]["frozen"].abs().max() == 0  # never updated
    # the tied matrix is all-reduced once a step, the frozen vector never: 2Ψ(n-1)/n, Ψ trainable
    psi = sum(p.numel() for n, p in ref.items() if n != "frozen")
    assert res[0]["dp"]["bytes_per_step"] == 2 * (2 - 1) / 2 * psi * 4
