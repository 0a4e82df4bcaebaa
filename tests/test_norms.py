"""From-scratch normalisation layers vs their PyTorch twins, and the experiments built on them."""
import math

import pytest
import torch

from dpo_lab.arch import norm_placement as npl
from dpo_lab.arch.norms import (BatchNorm1d, LayerNorm, RMSNorm, WeightNormLinear, batch_dependence,
                                batchnorm_train_eval_gap, compare_with_torch, invariance, torch_twin)
from dpo_lab.arch.toy_tasks import MarkovTask, warmup_lr

KINDS = ("batchnorm", "layernorm", "rmsnorm", "weightnorm")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_and_backward_match_torch(kind, seed):
    d = compare_with_torch(kind, seed=seed)
    assert d["forward"] <= 1e-5 and d["backward"] <= 1e-5, d


def test_batchnorm_eval_uses_running_statistics():
    bn = BatchNorm1d(8)
    for _ in range(3):
        bn(torch.randn(16, 8) * 2 + 1)
    bn.eval()
    x = torch.randn(4, 8)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), expected)
    assert not torch.allclose(bn.running_mean, torch.zeros(8))  # they were updated


def test_batchnorm_3d_input_and_bad_shape():
    ours, ref = torch_twin("batchnorm", 6)
    x = torch.randn(4, 6, 5)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="expects"):
        ours(torch.randn(2, 6, 3, 3))


def test_batch_of_one_erases_the_input():
    bn = BatchNorm1d(5)
    with torch.no_grad():
        bn.bias.copy_(torch.arange(5.0))
    torch.testing.assert_close(bn(torch.randn(1, 5)), torch.arange(5.0)[None])


def test_weightnorm_rows_have_norm_g():
    layer = WeightNormLinear(7, 3)
    with torch.no_grad():
        layer.g.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.tensor([1.0, 2.0, 3.0]))


def test_rmsnorm_bf16_keeps_dtype_and_matches_torch():
    ours, ref = torch_twin("rmsnorm", 32)
    x = torch.randn(4, 32).bfloat16()
    y = ours.bfloat16()(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.bfloat16()(x), atol=2e-2, rtol=2e-2)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="groupnorm"):
        torch_twin("groupnorm", 4)


def test_what_each_norm_looks_at():
    assert batch_dependence(BatchNorm1d(32), 2) > 3 * batch_dependence(BatchNorm1d(32), 64) > 0
    assert batch_dependence(LayerNorm(32), 2) == 0.0
    assert batch_dependence(RMSNorm(32), 2) == 0.0
    assert batchnorm_train_eval_gap(2) > 3 * batchnorm_train_eval_gap(64)
    ln, rms = invariance(LayerNorm(64)), invariance(RMSNorm(64))
    assert ln["scale"] < 1e-4 and ln["shift"] < 1e-4 and ln["scale_and_shift"] < 1e-4
    assert rms["scale"] < 1e-4 and rms["shift"] > 0.1


def test_classify_outcomes():
    task = MarkovTask(16, 2, seed=0)
    h_uni, h_min = npl.unigram_entropy(task), task.entropy_rate()
    assert h_min < h_uni < math.log(16) + 1e-6
    assert npl.classify([3.0] * 9 + [math.nan], task)[0] == "diverged"
    assert npl.classify([2.0] * 5 + [9.0] * 5, task)[0] == "diverged"
    assert npl.classify([h_uni + 0.3] + [h_uni] * 9, task)[0] == "stalled"
    outcome, final, progress = npl.classify([h_uni + 0.3] + [h_min + 0.01] * 9, task)
    assert outcome == "trained" and progress > 0.9 and final == pytest.approx(h_min + 0.01)


def test_grad_norms_at_init_one_per_layer():
    task = MarkovTask(16, 2, seed=0)
    norms = npl.grad_norms_at_init(3, False, task, dim=16, n_heads=2)
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)


def test_warmup_schedule():
    assert warmup_lr(0, 1.0, 4) == 0.25 and warmup_lr(3, 1.0, 4) == 1.0 and warmup_lr(10, 1.0, 4) == 1.0
    assert warmup_lr(0, 1.0, 0) == 1.0
