"""The DPO loss and its variants, and the metrics TRL logs.

Conventions (those of the DPO paper, its reference code and TRL):
- a sequence's log-prob is the SUM of its completion tokens' log-probs (prompt and padding masked);
- Δ = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x));
- the implicit reward of a completion is β·(log πθ − log π_ref).
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Log-prob of each sequence's completion: logits[:, t] predicts input_ids[:, t + 1].

    loss_mask (B, T) is 1 on completion tokens. Returns (B,) sums, or per-token means if `average`
    (which, as the lesson shows, rescales the effective β by the completion length).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:].to(token_logp.dtype)
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def _check_shapes(**tensors) -> None:
    """Every argument must have the first one's shape: broadcasting would silently pair the
    wrong completions."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {first} has {tuple(ref.shape)}: "
                             f"dpo_loss needs one value per pair in each")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair losses and the implicit rewards of chosen and rejected completions.

    sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε = label_smoothing: conservative DPO; ε = 0: DPO)
    robust:  [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)   (unbiased under label noise ε)
    hinge:   relu(1 − βΔ)   (SLiC)
    ipo:     (Δ' − 1/(2β))², Δ' built from per-token *mean* log-ratios as TRL does; pass the
             completion lengths, else sequence sums are used as in the IPO paper.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; have {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if not float(beta) > 0:  # also catches NaN; β ≤ 0 flips or erases the preference
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                  ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if (chosen_lengths is None) != (rejected_lengths is None):
        given = "chosen_lengths" if rejected_lengths is None else "rejected_lengths"
        raise ValueError(f"got {given} alone: pass both chosen_lengths and rejected_lengths "
                         f"(per-token means, as TRL's IPO) or neither (sequence sums)")
    if chosen_lengths is not None:
        _check_shapes(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths,
                      rejected_lengths=rejected_lengths)
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        if chosen_lengths is not None:
            delta = (chosen_logratios / chosen_lengths.clamp(min=1)
                     - rejected_logratios / rejected_lengths.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def completion_logit_sums(logits: torch.Tensor, loss_mask: torch.Tensor):
    """Per sequence: the sum over completion tokens of each token's mean-over-vocabulary logit, and
    the number of those tokens (same shift as `sequence_logps`). TRL's `logits/chosen` is the
    batch's token-weighted mean, sum of sums / sum of counts, so ranks and micro-batches add up."""
    mean_logit = logits[:, :-1].detach().float().mean(-1)
    mask = loss_mask[:, 1:].to(mean_logit.dtype)
    return (mean_logit * mask).sum(-1), mask.sum(-1)


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected,
                logit_sums=None) -> dict:
    """Batch means under TRL's metric names, so TRL users can read our logs.

    `rewards/accuracies` counts margins strictly above 0 (TRL's `>`): a tie, e.g. every pair at
    step 1 when the policy equals the reference, counts as wrong, so step 1 logs 0.0, not 0.5.
    `logit_sums`: `completion_logit_sums` of the [chosen; rejected] rows, for `logits/*`.
    """
    margins = chosen_rewards - rejected_rewards
    out = {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    if logit_sums is not None:
        (sum_c, sum_r), (n_c, n_r) = (t.chunk(2) for t in logit_sums)
        out["logits/chosen"] = (sum_c.sum() / n_c.sum().clamp(min=1)).item()
        out["logits/rejected"] = (sum_r.sum() / n_r.sum().clamp(min=1)).item()
    return out


def gradient_weight(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """σ(−βΔ) = σ(r̂_l − r̂_w): how hard the sigmoid loss pushes a pair; large when it is ranked wrongly."""
    return torch.sigmoid(-beta * delta)
