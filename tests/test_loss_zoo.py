"""The loss zoo against TRL 1.16 itself: TRL's `DPOTrainer._compute_loss` (a real trainer, built
once) runs on random per-token log-probs, and ours on the same tensors; losses, gradients with
respect to the policy's per-token log-probs, and the logged metrics must agree in fp32."""
import re
import warnings
import zlib

import pytest
import torch

from dpo_lab.dpo.fdiv import F_DIVERGENCE_LOSSES, F_DIVERGENCES
from dpo_lab.dpo.ld import ld_sequence_logps
from dpo_lab.dpo.loss import LOSS_TYPES, dpo_loss, dpo_metrics
from dpo_lab.dpo.trl_check import trl_loss_on_logps, zoo_trainer

T = 12  # tokens per row: prompt, completion, padding
TOL = dict(atol=1e-6, rtol=1e-6)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def trainer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zoo_trainer()


def batch(pairs: int, seed: int):
    """Per-token log-probs (2B, T−1) of policy and reference and the completion mask (2B, T) of rows
    [chosen; rejected]; prompts and completion lengths differ row to row."""
    from dpo_lab.dpo.zoo import random_logps  # random inputs only: the losses compared are not in it
    return random_logps(pairs, T, seed)


def ours(policy, ref, mask, ld_alpha=None, **settings):
    on = mask[:, 1:]
    pc, pr = ld_sequence_logps(policy, on, ld_alpha).chunk(2)
    rc, rr = ld_sequence_logps(ref, on, ld_alpha).chunk(2)
    lc, lr = on.sum(-1).chunk(2)
    plain_chosen = ld_sequence_logps(policy, on, None).chunk(2)[0]
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                              sft_chosen_logps=plain_chosen, **settings)
    return losses, dpo_metrics(losses, cr, rj, pc, pr)


def assert_equal_to_trl(trainer, pairs, seed, trl_settings=None, **settings):
    """Loss, gradient and metrics of ours (settings) and TRL's (trl_settings, default the same)."""
    policy, ref, mask = batch(pairs, seed)
    p_trl, p_ours = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    want, trl_metrics = trl_loss_on_logps(trainer, p_trl, ref, mask, **(trl_settings or settings))
    want.backward()
    losses, metrics = ours(p_ours, ref, mask, **settings)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), want.detach(), **TOL)
    torch.testing.assert_close(p_ours.grad, p_trl.grad, **TOL)
    assert p_trl.grad.abs().sum() > 0  # the comparison saw a real gradient
    for k in METRICS:
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=1e-6), k
    return losses.mean().item()


@pytest.mark.parametrize("pairs", [1, 3, 8])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_equals_trl(trainer, loss_type, beta, eps, pairs):
    seed = zlib.crc32(repr((loss_type, beta, eps, pairs)).encode())  # str hash() varies per process
    settings = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    if loss_type == "exo_pair" and eps == 0:  # log ε: TRL's __init__ refuses it, and so do we
        with pytest.raises(ValueError, match="exo_pair"):
            assert_equal_to_trl(trainer, pairs, seed, trl_settings={**settings, "label_smoothing": 0.1}, **settings)
        return
    if loss_type == "sigmoid" and eps > 0:
        # ours is conservative DPO; TRL 1.16's sigmoid ignores ε, its AOT on a single pair is cDPO
        for i in range(pairs):
            assert_equal_to_trl(trainer, 1, seed + i, trl_settings={**settings, "loss_type": "aot"}, **settings)
        return
    assert_equal_to_trl(trainer, pairs, seed, **settings)


ALPHAS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.0),
          ("alpha_divergence", 0.3), ("alpha_divergence", 0.7), ("alpha_divergence", 1.0)]


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("fdiv, alpha", ALPHAS)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_f_divergences_equal_trl(trainer, loss_type, fdiv, alpha, beta):
    eps = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
    assert_equal_to_trl(trainer, 4, 7, beta=beta, loss_type=loss_type, label_smoothing=eps,
                        f_divergence_type=fdiv, f_alpha_divergence_coef=alpha)


@pytest.mark.parametrize("pairs", [1, 4])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "sft", "aot", "apo_zero"])
def test_ld_alpha_equals_trl(trainer, loss_type, ld_alpha, pairs):
    assert_equal_to_trl(trainer, pairs, 11, beta=0.5, loss_type=loss_type, ld_alpha=ld_alpha)


def test_ld_alpha_changes_the_loss(trainer):
    """The batches really have pairs of unequal length, so LD-DPO is not DPO on them."""
    plain = assert_equal_to_trl(trainer, 4, 11, beta=0.5, loss_type="sigmoid")
    ld = assert_equal_to_trl(trainer, 4, 11, beta=0.5, loss_type="sigmoid", ld_alpha=0.5)
    assert abs(plain - ld) > 1e-3


@pytest.mark.parametrize("loss_type, weights, extra", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),                       # MPO
    (["ipo", "hinge", "robust"], [0.5, 2.0, 1.0], {"label_smoothing": 0.2}),
    (["sigmoid_norm", "sft"], None, {"ld_alpha": 0.3}),
    (["exo_pair", "discopop"], [1.0, 0.5], {"label_smoothing": 0.01, "discopop_tau": 0.2}),
    (["sigmoid", "sft"], [1.0, 0.1], {"f_divergence_type": "js_divergence"}),
])
def test_weighted_combinations_equal_trl(trainer, loss_type, weights, extra):
    assert_equal_to_trl(trainer, 5, 3, beta=0.3, loss_type=loss_type, loss_weights=weights, **extra)


def _trl_names(field: str) -> set:
    from trl import DPOConfig
    return set(re.findall(r"`'?(\w+)'?`", DPOConfig.__dataclass_fields__[field].metadata["help"]))


def test_the_lists_are_trls():
    assert set(LOSS_TYPES) == _trl_names("loss_type") - {"loss_weights"}
    names = _trl_names("f_divergence_type")
    assert set(F_DIVERGENCES) <= names and set(F_DIVERGENCE_LOSSES) == names - set(F_DIVERGENCES)


def test_errors_name_the_bad_input():
    x = torch.zeros(2)
    n = torch.ones(2)
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'; valid: sigmoid, hinge, ipo, .*sigmoid_norm"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match=r"loss_weights has 2 weights for 3 loss types"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2],
                 chosen_lengths=n, rejected_lengths=n)
    with pytest.raises(ValueError, match=r"f_alpha_divergence_coef must lie in \[0, 1\], got 1.5"):
        dpo_loss(x, x, x, x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5)
    with pytest.raises(ValueError, match=r"unknown f_divergence_type 'kl'"):
        dpo_loss(x, x, x, x, f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"does not apply to loss type\(s\) \['nca_pair'\]"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\].*got -0.1"):
        ld_sequence_logps(torch.zeros(2, 3), torch.ones(2, 3), -0.1)
    with pytest.raises(ValueError, match=r"\['sigmoid_norm'\] needs chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="sigmoid_norm")
