"""The DPO gradient in closed form, written out so that the notebook can check it against autograd.

With u = βΔ and Δ = (log πθ(y_w) − log π_ref(y_w)) − (log πθ(y_l) − log π_ref(y_l)):

    d/du log σ(u) = σ(u)·σ(−u)/σ(u) = σ(−u),  so for DPO  ℓ(u) = −log σ(u),  dℓ/du = −σ(−u).

Then dℓ/d log πθ(y_w) = β·dℓ/du and dℓ/d log πθ(y_l) = −β·dℓ/du (Rafailov et al., 2023, §4), and
through the sequence log-prob, d log πθ(y)/d z_t = onehot(y_{t+1}) − softmax(z_t) on completion
positions (z_t: the logits at position t, which predict token t + 1).

Conservative DPO (Mitchell, 2023): ℓ_ε = −(1−ε) log σ(u) − ε log σ(−u), dℓ_ε/du = −(1−ε)σ(−u) + ε σ(u),
which vanishes at u* = log((1−ε)/ε): a finite optimum margin.
Robust DPO (Chowdhury et al., 2024): ℓ = [−(1−ε) log σ(u) + ε log σ(−u)]/(1−2ε),
dℓ/du = −[(1−ε)σ(−u) + ε σ(u)]/(1−2ε) < 0 for every u, tending to −ε/(1−2ε): no minimiser, the loss is
unbounded below.
"""
import math

import torch


def dloss_du(u: torch.Tensor, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Derivative of the per-pair loss with respect to the scaled margin u = βΔ."""
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)
    if loss_type == "robust":
        return -((1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)) / (1 - 2 * eps)
    raise ValueError(f"closed-form gradient written for loss_type 'sigmoid' and 'robust', got {loss_type!r}")


def grad_wrt_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                   loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """d(per-pair loss)/d log πθ(y_w) and /d log πθ(y_l), one value per pair each."""
    u = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    g = beta * dloss_du(u, loss_type, label_smoothing)
    return g, -g


def grad_wrt_logits(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                    dlogp: torch.Tensor) -> torch.Tensor:
    """Chain rule through the summed completion log-prob: dlogp (B,) times
    [onehot(input_ids[:, t+1]) − softmax(logits[:, t])] on completion positions, 0 elsewhere."""
    p = torch.softmax(logits[:, :-1], dim=-1)
    onehot = torch.nn.functional.one_hot(input_ids[:, 1:], logits.shape[-1]).to(p.dtype)
    per_token = (onehot - p) * loss_mask[:, 1:, None].to(p.dtype)
    grad = torch.zeros_like(logits)
    grad[:, :-1] = dlogp[:, None, None] * per_token
    return grad


def cdpo_optimal_margin(label_smoothing: float) -> float:
    """u* = log((1−ε)/ε), where conservative DPO's derivative −(1−ε)σ(−u) + εσ(u) is zero."""
    if not 0 < label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in (0, 0.5) for a finite optimum, got {label_smoothing}")
    return math.log((1 - label_smoothing) / label_smoothing)
