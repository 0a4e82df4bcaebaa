"""LD-DPO: length-desensitised sequence log-probs.

Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (arXiv:2409.06411).
A sequence log-prob is a sum over tokens, so the longer completion of a pair gets the larger
|log-ratio| and DPO drifts toward verbosity. LD-DPO keeps the tokens both completions share in
length at weight 1 and weighs the longer one's extra tokens by α:
    log p̂(y) = Σ_{t ≤ ℓ_s} log p(y_t) + α Σ_{t > ℓ_s} log p(y_t),   ℓ_s = min(ℓ_chosen, ℓ_rejected).
α = 1 is DPO; α = 0 drops the tail. This is TRL 1.16's `ld_alpha` (same split, same rows layout).
"""
import torch


def check_ld_alpha(ld_alpha) -> None:
    if ld_alpha is not None and not 0.0 <= float(ld_alpha) <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1] (or be None: plain sums), got {ld_alpha}")


def ld_weights(mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """Per-token weights for rows [chosen; rejected] (2B, T): 1 on the first ℓ_s completion tokens
    of each row (ℓ_s shared by the pair), α on its later completion tokens, 0 off the completion."""
    check_ld_alpha(ld_alpha)
    if mask.shape[0] % 2:
        raise ValueError(f"mask has {mask.shape[0]} rows; LD-DPO needs [chosen; rejected], an even count")
    mask = mask.to(torch.int64)
    position = mask.cumsum(-1)                       # k-th completion token of its row has position k
    chosen_len, rejected_len = mask.sum(-1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)[:, None]
    weights = torch.where(position <= shared, 1.0, float(ld_alpha))
    return weights * mask


def ld_sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """(2B,) sequence log-probs from per-token log-probs (2B, T) and the completion mask of the same
    shape: plain sums when ld_alpha is None, LD-DPO sums otherwise."""
    if ld_alpha is None:
        return (token_logps * mask.to(token_logps.dtype)).sum(-1)
    return (token_logps * ld_weights(mask, ld_alpha).to(token_logps.dtype)).sum(-1)


def ld_token_weights(seq: torch.Tensor, n_seq: int, ld_alpha: float) -> torch.Tensor:
    """`ld_weights` for completion tokens given one by one, any layout (padded or packed rows):
    seq (N,) names each token's sequence ([chosen_0..chosen_B, rejected_0..rejected_B], n_seq = 2B),
    a sequence's tokens in time order. Returns (N,) weights: 1 on the first ℓ_s of a sequence, α after."""
    check_ld_alpha(ld_alpha)
    if n_seq % 2:
        raise ValueError(f"n_seq is {n_seq}; LD-DPO needs [chosen; rejected], an even count")
    counts = torch.bincount(seq, minlength=n_seq)
    # k-th token of its sequence (1-based): rank in a stable sort by sequence minus where it starts
    order = torch.sort(seq, stable=True).indices
    starts = counts.cumsum(0) - counts
    position = torch.empty_like(seq)
    position[order] = torch.arange(1, len(seq) + 1, device=seq.device) - starts[seq[order]]
    chosen_len, rejected_len = counts.chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)
    one = torch.ones((), dtype=torch.float32, device=seq.device)
    return torch.where(position <= shared[seq], one, float(ld_alpha))
