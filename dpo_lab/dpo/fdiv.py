"""f-DPO: the reverse-KL regulariser of DPO swapped for another f-divergence.

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints" (arXiv:2309.16240): with an f-divergence penalty, the implicit reward of a
completion is β·f'(π_θ/π_ref) instead of β·log(π_θ/π_ref), and the log Z(x) term still cancels in
the chosen − rejected difference. So only the losses built on that difference can use it (the
set TRL 1.16 allows: `F_DIVERGENCE_LOSSES`).
"""
import math

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# exp(t) must stay finite after the cast back to the input dtype (TRL 1.16's bounds)
_EXP_MAX = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}


def check_f_divergence(f_divergence_type: str, alpha: float, loss_types) -> None:
    """Errors name the bad input: an unknown divergence, α outside [0, 1], or a loss that has no
    f-divergence form."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
    # TRL's α interpolates forward KL (α = 0) and reverse KL (α = 1); the f-DPO paper uses α in (0, 1)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"f_alpha_divergence_coef must lie in [0, 1], got {alpha}")
    bad = [t for t in loss_types if t not in F_DIVERGENCE_LOSSES]
    if f_divergence_type != "reverse_kl" and bad:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} does not apply to loss type(s) {bad} "
                         f"(their log Z(x) does not cancel); it applies to: {', '.join(F_DIVERGENCE_LOSSES)}")


def f_divergence_scores(logratio: torch.Tensor, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = π_θ/π_ref, from logratio = log u; the score that replaces the log-ratio.

    reverse_kl: log u (DPO)                 forward_kl: 1 − 1/u
    js_divergence: log(2u/(1+u))            alpha_divergence: (u^(α−1) − 1)/(α − 1)
    The α form is TRL's (`f_alpha_divergence_coef`): α = 1 is its log u limit, α = 0 forward KL.
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)  # log(2u/(1+u)) = log 2 + log σ(log u)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio  # u^(α−1) = exp(t), computed in fp32 and clamped below overflow
        u_pow = torch.exp(t.float().clamp(max=_EXP_MAX[t.dtype])) if t.dtype in _EXP_MAX else torch.exp(t)
        return (u_pow - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
