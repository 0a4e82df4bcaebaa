"""Likelihood displacement on a log-linear policy (dpo_lab.dpo.displacement)."""
import pytest
import torch

from dpo_lab.dpo.displacement import train_pair

THETA0 = torch.tensor([1.0, 0.0], dtype=torch.float64)


def _phi(unwanted):
    # y_w, y_l (similar: they differ in the second feature only), a third response, a neutral one
    return torch.tensor([[1.0, 0.0], [1.0, -0.5], unwanted, [0.0, 0.0]], dtype=torch.float64)


def test_dpo_lowers_the_chosen_response_and_feeds_one_along_phi_w_minus_phi_l():
    logp, margin = train_pair(_phi([0.0, 1.0]), THETA0, 0, 1, beta=1.0, steps=200, lr=1.0)
    assert margin[-1] > 3 and (margin.diff() >= 0).all()
    assert logp[-1, 0] < logp[0, 0] - 3          # the chosen log-prob fell
    assert logp[-1, 2].exp() > 0.9                # to the response in no pair


def test_without_a_response_along_phi_w_minus_phi_l_the_chosen_rises():
    logp, _ = train_pair(_phi([0.0, -1.0]), THETA0, 0, 1, beta=1.0, steps=200, lr=1.0)
    assert logp[-1, 0] > logp[0, 0]


def test_dpop_keeps_the_chosen_response_at_its_reference_probability():
    logp, margin = train_pair(_phi([0.0, 1.0]), THETA0, 0, 1, beta=1.0, steps=200, lr=1.0, dpop_lambda=5.0)
    assert margin[-1] > 3
    assert (logp[:, 0] - logp[0, 0]).min() > -0.1


def test_gradient_step_is_autograds_on_the_dpo_loss():
    # one step by hand: ∇θ(−log σ(βΔ)) = −β σ(−βΔ) (φ_w − φ_l), Δ = 0 at the start
    phi, beta, lr = _phi([0.0, 1.0]), 0.5, 0.3
    logp, _ = train_pair(phi, THETA0, 0, 1, beta=beta, steps=1, lr=lr)
    theta1 = THETA0 + lr * beta * 0.5 * (phi[0] - phi[1])
    torch.testing.assert_close(logp[1], torch.log_softmax(phi @ theta1, -1))


def test_bad_pair_is_named():
    with pytest.raises(ValueError, match="chosen=0 and rejected=0"):
        train_pair(_phi([0.0, 1.0]), THETA0, 0, 0, beta=1.0, steps=1, lr=1.0)
