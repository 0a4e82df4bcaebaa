"""GRPO from scratch (dpo_lab.rl.grpo) against TRL 1.16's GRPOTrainer itself (dpo_lab.rl.trl_check):
advantages through `_generate_and_score_completions`, loss, gradient and logged metrics through
`_compute_loss`, for every loss_type × scale_rewards × beta × clipping × batch shape, and each
loss type's own parameters (CISPO's ε_max, SAPO's temperatures, VESPO's Gamma shape), GSPO/LUSPO's
sequence-level ratio, two-sided clipping and the off-policy sequence mask."""
import itertools

import pytest
import torch

from dpo_lab.rl import trl_check
from dpo_lab.rl.grpo import CLIPPED, LOSS_TYPES, SCALES, TRL_LOSS_TYPES, group_advantages, grpo_loss, k3_kl

# fp32 with sums over ≤ 60 tokens of O(1) terms: reorderings cost ~1e-7. Each planted bug
# (normalisation, KL sign, swapped clip bounds, batch std) moves the loss by > 1e-3 on these batches.
TOL = 1e-5
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO's clip-higher), so swapped bounds show
G = 4
SHAPES = [(2, 5), (3, 7), (2, 12)]  # (prompts, completion length); B = prompts × G rows


def _rewards(n_prompts, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, (n_prompts * G,), generator=g).float()  # the checker's 0/1 reward
    r[:G] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a group with spread, whatever the draw
    r[-G:] = 1.0  # and one with none (advantage 0)
    return r + 0.25 * torch.rand(r.shape, generator=g) * (r > 0)  # non-binary too: std matters


def _batch(n_prompts, c, clipping, seed):
    """Per-token log-probs with ragged completion lengths (right padding); the old policy is a
    little (ratios inside 1±ε) or far (most ratios clipped) from the current one."""
    g = torch.Generator().manual_seed(seed)
    b = n_prompts * G
    logps = -torch.rand(b, c, generator=g) * 3
    lengths = torch.randint(1, c + 1, (b,), generator=g)
    lengths[0] = c
    mask = (torch.arange(c) < lengths[:, None]).float()
    spread = 0.6 if clipping else 0.01
    old = logps + spread * torch.randn(b, c, generator=g)
    ref = logps + 0.3 * torch.randn(b, c, generator=g)
    return logps, old, ref, mask


CASES = list(itertools.product(CLIPPED, SCALES, [0.0, 0.04], [False, True], range(len(SHAPES))))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n_prompts", [1, 3])
def test_advantages_equal_trl(scale, n_prompts):
    r = _rewards(n_prompts, seed=n_prompts) if n_prompts > 1 else torch.tensor([1.0, 0.0, 0.5, 0.0])
    ours = group_advantages(r, G, scale)
    theirs = trl_check.trl_advantages(r, G, scale)
    assert (ours - theirs).abs().max().item() <= TOL
    assert ours.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("loss_type,scale,beta,clipping,shape", CASES)
def test_loss_gradient_and_metrics_equal_trl(loss_type, scale, beta, clipping, shape):
    n_prompts, c = SHAPES[shape]
    seed = 100 * shape + 10 * clipping + int(beta > 0)
    logps, old, ref, mask = _batch(n_prompts, c, clipping, seed)
    adv = group_advantages(_rewards(n_prompts, seed), G, scale)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
              max_completion_length=c + 3,  # dr_grpo's constant is the generation cap, not T
              kl_ratio_correction=bool(shape % 2))  # both KL forms, TRL's default (on) and the paper's
    ours_in, theirs_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss, metrics = grpo_loss(ours_in, old, ref, adv, mask, **kw)
    t_loss, t_metrics = trl_check.trl_loss(theirs_in, old, ref, adv, mask, **kw)
    loss.backward(), t_loss.backward()
    assert abs(loss.item() - t_loss.item()) <= TOL
    assert (ours_in.grad - theirs_in.grad).abs().max().item() <= TOL
    for k, v in metrics.items():
        assert abs(v - t_metrics[k]) <= TOL, k
    assert set(metrics) == {k for k in t_metrics if k.endswith("_mean") or k == "kl"}
    # the case is what it says: clipping bites or not
    assert (metrics["clip_ratio/region_mean"] > 0.1) == clipping


@pytest.mark.parametrize("level,delta", [("sequence", None), ("token", 1.1), ("sequence", 1.1)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clipping", [False, True])
def test_gspo_and_two_sided_clipping_equal_trl(level, delta, beta, clipping):
    # delta = 1.1 < 1 + ε_high: the cap binds on positive-advantage tokens inside the clip range too
    logps, old, ref, mask = _batch(3, 7, clipping, seed=7 + clipping)
    adv = group_advantages(_rewards(3, 7), G, "group")
    kw = dict(loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, kl_ratio_correction=True,
              importance_sampling_level=level, delta=delta)
    x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, **kw)
    t_loss, t_metrics = trl_check.trl_loss(y, old, ref, adv, mask, **kw)
    loss.backward(), t_loss.backward()
    assert abs(loss.item() - t_loss.item()) <= TOL
    assert (x.grad - y.grad).abs().max().item() <= TOL
    for k, v in metrics.items():
        assert abs(v - t_metrics[k]) <= TOL, k
    if clipping:  # ratios far from 1: the option changes the loss (near 1 it barely can)
        plain, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "importance_sampling_level": "token", "delta": None})
        assert abs(loss.item() - plain.item()) > 1e-3


def _equal_trl(logps, old, ref, adv, mask, **kw):
    """Our loss, gradient w.r.t. logps and metrics against TRL's on one batch; returns our (loss, metrics)."""
    x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, **kw)
    t_loss, t_metrics = trl_check.trl_loss(y, old, ref, adv, mask, **kw)
    loss.backward(), t_loss.backward()
    assert abs(loss.item() - t_loss.item()) <= TOL
    assert (x.grad - y.grad).abs().max().item() <= TOL
    assert x.grad.abs().max() > 1e-3  # a gradient to compare
    # every statistic TRL logs for the loss, bar the entropy (not ours) and per-sequence extremes
    assert set(metrics) == set(t_metrics) - {"entropy", "clip_ratio/low_min", "clip_ratio/high_max"}
    for k, v in metrics.items():
        assert abs(v - t_metrics[k]) <= TOL, k
    return loss, metrics


# Each type's parameters: TRL's defaults and a second setting that moves the loss (CISPO's ε_max = 5 is
# ScaleRL's recommendation, 1.2 a cap that binds on the far-off-policy batch).
OWN_PARAMS = {"cispo": [dict(epsilon_high=5.0), dict(epsilon_high=1.2)],
              "sapo": [dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
                       dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)],
              "vespo": [dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
                        dict(vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=2.0, vespo_lambda_neg=4.0)]}
OWN_CASES = [(lt, i, beta, clipping, shape) for lt, params in OWN_PARAMS.items() for i in range(len(params))
             for beta, clipping, shape in itertools.product([0.0, 0.04], [False, True], range(len(SHAPES)))]


@pytest.mark.parametrize("loss_type,param_set,beta,clipping,shape", OWN_CASES)
def test_cispo_sapo_vespo_equal_trl(loss_type, param_set, beta, clipping, shape):
    n_prompts, c = SHAPES[shape]
    seed = 100 * shape + 10 * clipping + int(beta > 0)
    logps, old, ref, mask = _batch(n_prompts, c, clipping, seed)
    adv = group_advantages(_rewards(n_prompts, seed), G, "group")
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
              kl_ratio_correction=bool(shape % 2))
    kw.update(OWN_PARAMS[loss_type][param_set])
    loss, metrics = _equal_trl(logps, old, ref, adv, mask, **kw)
    if loss_type == "cispo" and kw["epsilon_high"] < 2:  # the case is what it says: the cap bites or not
        assert (metrics["cispo_clip_ratio"] > 0.05) == clipping
    if param_set and (clipping or loss_type != "cispo"):  # the second setting is not the default in disguise
        # (CISPO's lower cap only matters where ratios reach it)
        default, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, **OWN_PARAMS[loss_type][0]})
        assert abs(loss.item() - default.item()) > 1e-4


@pytest.mark.parametrize("loss_type", ["luspo", "sapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clipping", [False, True])
def test_sequence_level_luspo_and_sapo_equal_trl(loss_type, beta, clipping):
    # LUSPO is GSPO's sequence ratio with a length-weighted sum (TRL warns at token level); SAPO takes either
    logps, old, ref, mask = _batch(3, 7, clipping, seed=11 + clipping)
    adv = group_advantages(_rewards(3, 11), G, "group")
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, kl_ratio_correction=True,
              importance_sampling_level="sequence")
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    if clipping:
        token, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "importance_sampling_level": "token"})
        assert abs(loss.item() - token.item()) > 1e-3


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_off_policy_mask_equal_trl(loss_type, beta):
    logps, old, ref, mask = _batch(3, 7, True, seed=5)
    adv = group_advantages(_rewards(3, 5), G, "group")
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
              off_policy_mask_threshold=0.05)
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    unmasked, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "off_policy_mask_threshold": None})
    assert abs(loss.item() - unmasked.item()) > 1e-4  # some negative-advantage sequence drifted past 0.05


def test_k3_is_a_nonnegative_kl_estimate():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(50, generator=g), torch.randn(50, generator=g)
    p, q = logits_p.log_softmax(0), logits_q.log_softmax(0)
    # E_{x~π}[k3] = KL(π‖π_ref) exactly, summing over the support
    assert torch.allclose((p.exp() * k3_kl(p, q)).sum(), torch.nn.functional.kl_div(q, p, log_target=True,
                                                                                     reduction="sum"), atol=1e-6)
    assert (k3_kl(p, q) >= 0).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="scale='std'"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="G=3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="needs loss_type in .*, not 'dapo'"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), loss_type="dapo",
                  importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), loss_type="ppo")


def test_the_notebook_sweep_equals_trl():
    d = trl_check.loss_vs_trl_max_abs_diff()
    # + GSPO / delta, sequence-level LUSPO / SAPO, second parameter settings, off-policy mask
    per_option = 2 * 2 * 2  # beta × KL form × clipping
    assert d["cases"] == ((len(LOSS_TYPES) * len(SCALES) + len(TRL_LOSS_TYPES) - len(LOSS_TYPES)) * per_option
                          + 3 * 2 * 2 + 2 * 2 * 2 + 3 * 2 * 2 + len(TRL_LOSS_TYPES))
    assert max(d["advantages"], d["loss"], d["grad"], d["metrics"]) <= TOL
