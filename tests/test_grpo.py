"""GRPO from scratch (dpo_lab.rl.grpo) against TRL 1.16's GRPOTrainer itself (dpo_lab.rl.trl_check):
advantages through `_generate_and_score_completions`, loss, gradient and logged metrics through
`_compute_loss`, for every loss_type × scale_rewards × beta × clipping × batch shape, and each
loss type's own parameters (CISPO's ε_max, SAPO's temperatures, VESPO's Gamma shape), GSPO/LUSPO's
sequence-level ratio, two-sided clipping, the off-policy sequence mask, the top-entropy token mask,
the entropy bonus and its adaptive controller."""
import itertools

import pytest
import torch

from dpo_lab.rl import trl_check
from dpo_lab.rl.grpo import (CLIPPED, LOSS_TYPES, SCALES, TRL_LOSS_TYPES, AdaptiveEntropy, entropy_bonus,
                              group_advantages, grpo_loss, k3_kl)

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


def _batch(n_prompts, c, clipping, seed, scale="group", empty_row=False):
    """(logps, old, ref, adv, mask, entropies): per-token log-probs with ragged completion lengths
    (right padding); the old policy is a little (ratios inside 1±ε) or far (most ratios clipped) from
    the current one. Entropies are in [0, 2) nats on completion tokens, some tied (rounded to 0.05),
    and 5 on padding: a quantile taken over padding too lands elsewhere."""
    g = torch.Generator().manual_seed(seed)
    b = n_prompts * G
    logps = -torch.rand(b, c, generator=g) * 3
    lengths = torch.randint(1, c + 1, (b,), generator=g)
    lengths[0] = c
    if empty_row:  # a completion with no token (all masked): per-sequence statistics skip it
        lengths[1] = 0
    mask = (torch.arange(c) < lengths[:, None]).float()
    spread = 0.6 if clipping else 0.01
    old = logps + spread * torch.randn(b, c, generator=g)
    ref = logps + 0.3 * torch.randn(b, c, generator=g)
    ent = (torch.rand(b, c, generator=g) * 40).round() / 20
    ent = torch.where(mask > 0, ent, torch.full_like(ent, 5.0))
    return logps, old, ref, group_advantages(_rewards(n_prompts, seed), G, scale), mask, ent


def _equal_trl(logps, old, ref, adv, mask, **kw):
    """Our loss, gradient w.r.t. logps and every logged metric against TRL's on one batch; returns our
    (loss, metrics). `entropy_coef`, TRL's controller's log, is compared by the adaptive test."""
    x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, **kw)
    t_loss, t_metrics = trl_check.trl_loss(y, old, ref, adv, mask, **kw)
    loss.backward(), t_loss.backward()
    assert abs(loss.item() - t_loss.item()) <= TOL
    assert (x.grad - y.grad).abs().max().item() <= TOL
    assert x.grad.abs().max() > 10 * TOL  # a gradient to compare (ρ=0 keeps one token: ~1e-3)
    assert set(metrics) == set(t_metrics) - {"entropy_coef"}
    for k, v in metrics.items():
        assert abs(v - t_metrics[k]) <= TOL, k
    return loss, metrics


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
    logps, old, ref, adv, mask, ent = _batch(n_prompts, c, clipping, seed, scale)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, entropies=ent,
              max_completion_length=c + 3,  # dr_grpo's constant is the generation cap, not T
              kl_ratio_correction=bool(shape % 2))  # both KL forms, TRL's default (on) and the paper's
    _, metrics = _equal_trl(logps, old, ref, adv, mask, **kw)
    # the case is what it says: clipping bites or not
    assert (metrics["clip_ratio/region_mean"] > 0.1) == clipping


@pytest.mark.parametrize("level,delta", [("sequence", None), ("token", 1.1), ("sequence", 1.1)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clipping", [False, True])
def test_gspo_and_two_sided_clipping_equal_trl(level, delta, beta, clipping):
    # delta = 1.1 < 1 + ε_high: the cap binds on positive-advantage tokens inside the clip range too
    logps, old, ref, adv, mask, ent = _batch(3, 7, clipping, seed=7 + clipping)
    kw = dict(loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, kl_ratio_correction=True,
              importance_sampling_level=level, delta=delta, entropies=ent)
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    if clipping:  # ratios far from 1: the option changes the loss (near 1 it barely can)
        plain, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "importance_sampling_level": "token", "delta": None})
        assert abs(loss.item() - plain.item()) > 1e-3


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
    logps, old, ref, adv, mask, ent = _batch(n_prompts, c, clipping, seed)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, entropies=ent,
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
    logps, old, ref, adv, mask, ent = _batch(3, 7, clipping, seed=11 + clipping)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, kl_ratio_correction=True,
              importance_sampling_level="sequence", entropies=ent)
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    if clipping:
        token, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "importance_sampling_level": "token"})
        assert abs(loss.item() - token.item()) > 1e-3


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_off_policy_mask_equal_trl(loss_type, beta):
    logps, old, ref, adv, mask, ent = _batch(3, 7, True, seed=5)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
              off_policy_mask_threshold=0.05, entropies=ent)
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    unmasked, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "off_policy_mask_threshold": None})
    assert abs(loss.item() - unmasked.item()) > 1e-4  # some negative-advantage sequence drifted past 0.05


# Top-ρ entropy tokens (Beyond the 80/20 Rule): ρ = 0 keeps only the maximum (with its ties), 0.2 is the
# paper's choice; the batch's entropies are rounded, so the threshold often falls on a tie.
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("shape,empty_row", [(0, False), (1, True)])
def test_top_entropy_quantile_equal_trl(loss_type, rho, shape, empty_row):
    n_prompts, c = SHAPES[shape]
    logps, old, ref, adv, mask, ent = _batch(n_prompts, c, True, seed=21 + shape, empty_row=empty_row)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.04, kl_ratio_correction=True,
              entropies=ent, top_entropy_quantile=rho,
              importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    loss, _ = _equal_trl(logps, old, ref, adv, mask, **kw)
    every, _ = grpo_loss(logps, old, ref, adv, mask, **{**kw, "top_entropy_quantile": 1.0})
    assert abs(loss.item() - every.item()) > 1e-4  # the mask drops tokens that mattered


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_entropy_bonus_equal_trl(loss_type, rho):
    logps, old, ref, adv, mask, ent = _batch(3, 7, True, seed=31)
    kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, entropies=ent,
              top_entropy_quantile=rho, entropy_coef=0.1, max_completion_length=9)
    loss, metrics = _equal_trl(logps, old, ref, adv, mask, **kw)
    # the bonus is the mean entropy of the kept tokens, whatever the loss type's normaliser
    assert loss.item() < metrics["policy_loss"] - 0.01


ADAPTIVE = dict(entropy_coef_min=0.01, entropy_coef_max=0.05, entropy_coef_delta=0.02, entropy_target=0.9)


@pytest.mark.parametrize("loss_type,rho", [("dapo", 1.0), ("grpo", 0.5), ("luspo", 1.0)])
def test_adaptive_entropy_equal_trl_over_steps(loss_type, rho):
    """Skywork-OR1's controller against TRL's over 7 optimizer steps whose entropy crosses the target both
    ways: the coefficient is raised to its max, lowered to its min, and the bonus is on only in steps after
    one at or below the target."""
    ctrl = AdaptiveEntropy(coef=0.03, coef_min=ADAPTIVE["entropy_coef_min"], coef_max=ADAPTIVE["entropy_coef_max"],
                           delta=ADAPTIVE["entropy_coef_delta"], target=ADAPTIVE["entropy_target"])
    coefs, applied = [], []
    for step, scale in enumerate([0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 0.5]):  # mean entropy ~0.5 or ~2 nats
        logps, old, ref, adv, mask, ent = _batch(3, 7, True, seed=40 + step)
        ent = ent * scale
        kw = dict(loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, entropies=ent,
                  top_entropy_quantile=rho)
        x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        applied.append(ctrl.coef_to_apply())
        loss, metrics = grpo_loss(x, old, ref, adv, mask, entropy_coef=applied[-1], **kw)
        t_loss, t_metrics = trl_check.trl_loss(y, old, ref, adv, mask, entropy_coef=0.03,
                                               adaptive_entropy=ADAPTIVE if step == 0 else "continue", **kw)
        loss.backward(), t_loss.backward()
        assert abs(loss.item() - t_loss.item()) <= TOL, step
        assert (x.grad - y.grad).abs().max().item() <= TOL, step
        keep = mask if rho == 1.0 else mask * (ent >= torch.quantile(ent[mask.bool()], 1 - rho))
        coefs.append(ctrl.update(entropy_bonus(ent, keep).item()))
        assert abs(coefs[-1] - t_metrics["entropy_coef"]) <= 1e-9, step
        if applied[-1]:
            assert abs(metrics["policy_loss"] - t_metrics["policy_loss"]) <= TOL
    # the steps exercise the controller: bonus off at first (no measurement), on, then off again; both bounds
    assert applied[0] == 0 and min(applied[1:4]) > 0 and applied[4] == applied[5] == 0
    assert max(coefs) == 0.05 and min(coefs) == 0.01


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
    with pytest.raises(ValueError, match="top_entropy_quantile=0.2, entropy_coef=0.0 need entropies"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2),
                  top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="top_entropy_quantile=1.5"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2),
                  entropies=torch.ones(1, 2), top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match=r"entropies \(1, 3\) must have mask's shape \(1, 2\)"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2),
                  entropies=torch.ones(1, 3), entropy_coef=0.1)


def test_the_notebook_sweep_equals_trl():
    d = trl_check.loss_vs_trl_max_abs_diff()
    # + GSPO / delta, sequence-level LUSPO / SAPO, second parameter settings, off-policy mask
    per_option = 2 * 2 * 2  # beta × KL form × clipping
    assert d["cases"] == ((len(LOSS_TYPES) * len(SCALES) + len(TRL_LOSS_TYPES) - len(LOSS_TYPES)) * per_option
                          + 3 * 2 * 2 + 2 * 2 * 2 + 3 * 2 * 2 + len(TRL_LOSS_TYPES))
    assert max(d["advantages"], d["loss"], d["grad"], d["metrics"]) <= TOL
