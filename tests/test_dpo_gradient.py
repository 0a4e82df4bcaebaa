"""The closed-form DPO gradient (dpo_lab.dpo.gradient) against torch.autograd through dpo_loss."""
import math

import pytest
import torch

from dpo_lab.dpo import gradient
from dpo_lab.dpo.loss import dpo_loss, sequence_logps


def _pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # margins spread over both signs and several units, so σ(−u) and σ(u) differ everywhere
    return [-30 + 6 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1)])
@pytest.mark.parametrize("beta", [0.1, 0.7])  # not 1: a missing β would go unseen
def test_grad_wrt_logps_matches_autograd(loss_type, eps, beta):
    pc, pr, rc, rr = _pairs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want_c, want_r = torch.autograd.grad(losses.sum(), (pc, pr))
    got_c, got_r = gradient.grad_wrt_logps(pc.detach(), pr.detach(), rc, rr, beta, loss_type, eps)
    torch.testing.assert_close(got_c, want_c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_r, want_r, rtol=1e-12, atol=1e-14)


def test_dpo_step_is_minus_sigma_of_minus_u():
    # −d log σ(u)/du = −σ(−u): at u = 2 that is −0.1192, not −σ(2) = −0.8808
    u = torch.tensor([2.0], dtype=torch.float64)
    assert gradient.dloss_du(u).item() == pytest.approx(-1 / (1 + math.exp(2)), abs=1e-15)


def test_grad_wrt_logits_matches_autograd_through_sequence_logps():
    g = torch.Generator().manual_seed(1)
    B, T, V, beta = 4, 12, 9, 0.3
    logits = 3 * torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(V, (2 * B, T), generator=g)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for b, (s, e) in enumerate([(2, 12), (3, 7), (2, 9), (4, 11)] * 2):
        mask[b, s:e] = 1
    ref = -20 + torch.randn(2 * B, generator=g, dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    logps = sequence_logps(z, ids, mask).double()
    losses, _, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta)
    (want,) = torch.autograd.grad(losses.sum(), z)
    lp = sequence_logps(logits, ids, mask).double()
    dc, dr = gradient.grad_wrt_logps(lp[:B], lp[B:], ref[:B], ref[B:], beta)
    got = gradient.grad_wrt_logits(logits, ids, mask, torch.cat([dc, dr]))
    # sequence_logps computes in float32 (.float()), so agreement is to float32 precision
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_conservative_dpo_has_a_finite_minimiser_and_robust_dpo_none():
    eps = 0.1
    u_star = gradient.cdpo_optimal_margin(eps)
    assert u_star == pytest.approx(math.log(9))
    # the minimiser of dpo_loss itself (not of the closed form) on a fine grid
    u = torch.linspace(0, 6, 60001, dtype=torch.float64)
    z = torch.zeros_like(u)
    cdpo, _, _ = dpo_loss(u, z, z, z, beta=1.0, label_smoothing=eps)
    assert u[cdpo.argmin()].item() == pytest.approx(u_star, abs=2e-4)
    robust, _, _ = dpo_loss(u, z, z, z, beta=1.0, loss_type="robust", label_smoothing=eps)
    assert robust.argmin().item() == len(u) - 1  # still falling at the edge
    assert (gradient.dloss_du(u, "robust", eps) < 0).all()
    big = torch.tensor([1e3], dtype=torch.float64)
    assert gradient.dloss_du(big, "robust", eps).item() == pytest.approx(-eps / (1 - 2 * eps))


def test_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="'ipo'"):
        gradient.dloss_du(torch.zeros(1), "ipo")
    with pytest.raises(ValueError, match="got 0.0"):
        gradient.cdpo_optimal_margin(0.0)
