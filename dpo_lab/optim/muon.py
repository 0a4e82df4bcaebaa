"""Muon (K. Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024), from scratch.

For each 2-D weight: momentum B ← μB + (1−μ)g, Nesterov look-ahead u = (1−μ)g + μB, then replace u
by (approximately) its orthogonal factor UVᵀ (u = USVᵀ) with a quintic Newton–Schulz iteration, so
every singular direction moves by the same amount. Step: θ ← (1−ηλ)θ − η·√max(1, rows/cols)·O.
"""
import math

import torch

from dpo_lab.optim.adamw import PerParameter

# Jordan's coefficients: chosen to maximise the slope at 0, so small singular values grow fast;
# the fixed point is not exactly 1 (singular values end up in roughly [0.7, 1.2]).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                  dtype=torch.bfloat16) -> torch.Tensor:
    """X ← aX + b(XXᵀ)X + c(XXᵀ)²X, `steps` times, after X ← G/‖G‖_F (so all σ ≤ 1).

    Works on the wide orientation (rows ≤ cols) so XXᵀ is the smaller Gram matrix. `dtype`
    bfloat16 is what torch.optim.Muon and Jordan use (the iteration tolerates low precision)."""
    if G.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(PerParameter):
    """Only for 2-D weights; embeddings, head and 1-D parameters go to AdamW (as in torch.optim.Muon)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 eps=1e-7, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, eps=eps, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a parameter of shape {tuple(p.shape)}")

    def update(self, p, g, group, state):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        B = state["momentum_buffer"]
        B.mul_(mu).add_(g, alpha=1 - mu)
        u = (1 - mu) * g + mu * B if group["nesterov"] else B
        O = newton_schulz(u, group["ns_steps"], eps=group["eps"], dtype=group["ns_dtype"])
        rows, cols = p.shape
        p.mul_(1 - lr * wd)
        # scale so tall matrices get the same per-entry update RMS as wide ones
        p.add_(O.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
