"""Likelihood displacement (Razin et al., 2024): DPO can lower the chosen response's probability while
the margin grows, and hand the mass to a response that is in no pair.

A log-linear policy over K responses, πθ(y) ∝ exp(θ·φ(y)), so ∇θ log πθ(y) = φ(y) − E_π[φ]. A DPO step
moves θ along φ_w − φ_l, which changes log πθ(y) by a multiple of (φ(y) − E_π[φ])·(φ_w − φ_l): a response
whose features point further along φ_w − φ_l than y_w's gains faster than y_w, and once it holds
mass, E_π[φ] follows it and log πθ(y_w) falls. Only the margin enters the loss, so nothing stops it.
DPOP (Pal et al., 2024) subtracts λ·max(0, log π_ref(y_w) − log πθ(y_w)) from the margin inside the
sigmoid, which penalises exactly that fall.
"""
import torch
import torch.nn.functional as F


def train_pair(features, theta0, chosen: int, rejected: int, beta: float, steps: int, lr: float,
               dpop_lambda: float = 0.0):
    """Gradient descent on the DPO (or DPOP) loss of one pair; returns the log-probs of every
    response (steps + 1, K) and the log-ratio margin Δ (steps + 1,) along the way."""
    if not 0 <= chosen < len(features) or not 0 <= rejected < len(features) or chosen == rejected:
        raise ValueError(f"chosen={chosen} and rejected={rejected} must be two different rows of "
                         f"the {len(features)} responses")
    ref_logp = torch.log_softmax(features @ theta0, -1)
    theta = theta0.clone().requires_grad_(True)
    logps, margins = [], []
    for step in range(steps + 1):
        logp = torch.log_softmax(features @ theta, -1)
        ratio = logp - ref_logp
        margin = ratio[chosen] - ratio[rejected]
        logps.append(logp.detach())
        margins.append(margin.detach())
        if step == steps:
            break
        penalty = dpop_lambda * torch.relu(-ratio[chosen])  # DPOP: only when y_w fell below π_ref
        loss = -F.logsigmoid(beta * (margin - penalty))
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return torch.stack(logps), torch.stack(margins)
