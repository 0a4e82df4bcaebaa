"""GRPO's objective, from scratch (names from the papers).

GRPO (Shao et al. 2024, DeepSeekMath §4.1): sample G completions per prompt, score them, and use
the reward standardised *within its group* as every token's advantage (no value model). The
per-token objective is PPO's clipped surrogate (Schulman et al. 2017),

    ratio_t = π_θ(o_t) / π_old(o_t),    L_t = −min(ratio_t · A, clip(ratio_t, 1−ε_low, 1+ε_high) · A)

plus β times the k3 estimator of KL(π_θ ‖ π_ref) (Schulman 2020, "Approximating KL divergence"):
k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0, unbiased and low-variance for samples from π_θ.

Normalisation choices that change the gradient (each a named option):
- scale: "group" divides A by the group's std (GRPO); "none" does not (Dr. GRPO, Liu et al. 2025:
  the std division up-weights easy/hard prompts); "batch" divides by the std of the whole batch.
- loss_type: how per-token losses become one number
    grpo     mean over each sequence's tokens, then over sequences (biases toward short wrong answers
             and long right ones, Dr. GRPO §3.1);
    bnpo     mean over all active tokens of the batch;
    dapo     sum over all active tokens / active tokens of the *global* batch (DAPO, Yu et al. 2025,
             "token-level policy gradient loss");
    dr_grpo  sum over tokens / (sequences × max_completion_length): a constant, so no length bias.
ε_high > ε_low is DAPO's "clip-higher".
Other surrogates TRL 1.16 offers (each a branch of `grpo_loss`, formulas as TRL 1.16 implements them):
    cispo    −sg(min(ratio, ε_max))·A·log π_θ, dapo's normalisation: clips the IS weight, not the update,
             so clipped tokens keep a gradient (MiniMax-M1, 2025; ε_max = epsilon_high);
    sapo     −σ(τ(ratio−1))·4/τ·A, τ by the sign of A: a soft gate instead of a hard clip (Soft Adaptive
             Policy Optimization, arXiv 2511.20347), grpo's normalisation;
    luspo    grpo's clipped surrogate, summed over each sequence's tokens, mean over sequences: each
             sequence weighted by its length (LUSPO, arXiv 2602.05261; with GSPO's sequence ratio);
    vespo    −sg(φ(w))·A·log π_θ with w the sequence's product of token ratios and the Gamma weight
             φ(w) = e^λ w^k e^{−λw} (k, λ by the sign of A), dapo's normalisation (VESPO, arXiv 2602.10693).
Token selection and regularisation (TRL 1.16's options too):
    top_entropy_quantile ρ   keep in the policy term only the tokens whose entropy is in the top ρ of the
             batch's completion tokens (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939);
    entropy_coef             loss − coef · mean entropy over the kept tokens, the same for every loss type;
    AdaptiveEntropy          Skywork-OR1's controller of that coefficient (He et al. 2025, arXiv 2505.22312).
TRL's vLLM importance-sampling correction (`vllm_importance_sampling_*`) is not here: it reweights for
the gap between vLLM's sampler and the trained model's log-probs, and our completions are sampled by
the trained model itself (dpo_lab.rl.rollout), so that ratio is 1.
"""
import math
from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate, clip metrics
LOSS_TYPES = CLIPPED[:4]  # the four normalisations of the clipped surrogate
TRL_LOSS_TYPES = LOSS_TYPES + ("cispo", "sapo", "luspo", "vespo")  # all that grpo_loss computes, as TRL 1.16
SEQUENCE_OK = ("grpo", "sapo", "luspo")  # TRL warns on the others: token sums misweight it, VESPO ignores it
STD_EPS = 1e-4  # added to the std as TRL does (a group of equal rewards has std 0 and advantage 0)


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """A_i = r_i − mean(group of r_i), divided by the std (unbiased, as torch.std) of the group,
    of the batch, or of nothing. `rewards` (N·G,) lists each prompt's G completions contiguously."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} is not N groups of G={G}")
    groups = rewards.view(-1, G)
    adv = (groups - groups.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        adv = adv / (groups.std(1).repeat_interleave(G) + STD_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std() + STD_EPS)
    return adv


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(ref − logp) − (ref − logp) − 1, an estimate of KL(π_θ ‖ π_ref)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def vespo_weights(log_ratio, mask, advantages, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """VESPO's Gamma weight φ(w) = exp(λ + k·log w − λ·w) per sequence (B, 1), detached; w = Π_t ratio_t
    of the sequence (a product, not GSPO's geometric mean), log w clamped to [log 1e-8, 20] as TRL does."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
        pos = advantages >= 0
        k = torch.where(pos, k_pos, k_neg)
        lam = torch.where(pos, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(logps, old_logps, advantages, mask, threshold):
    """DeepSeek-V3.2's off-policy sequence mask (B, 1): drop a sequence whose advantage is negative and
    whose mean per-token KL(π_old ‖ π_θ) estimate, log π_old − log π_θ, exceeds `threshold`."""
    kl = ((old_logps - logps.detach()) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (kl <= threshold)).to(mask.dtype)


def entropy_threshold(entropies, mask, top_entropy_quantile):
    """The entropy at quantile 1−ρ of the completion tokens (mask > 0) only, linear interpolation as
    torch.quantile (TRL's `get_high_entropy_mask`); None when there are no tokens. For a split batch,
    pass all its tokens' entropies (every group, every rank) as one (1, n) row."""
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile}: expected a value in [0, 1]")
    active = entropies.detach()[mask.bool()].float()
    return torch.quantile(active, 1 - top_entropy_quantile) if active.numel() else None


def high_entropy_mask(entropies, mask, threshold):
    """1 on completion tokens whose entropy is ≥ threshold (ties kept, so ρ=0 keeps the maximum); all 0
    when threshold is None (no tokens anywhere)."""
    if threshold is None:
        return torch.zeros_like(mask)
    return ((entropies.detach() >= threshold) & mask.bool()).to(mask.dtype)


def entropy_bonus(entropies, mask, num_tokens=None):
    """Mean entropy over `mask`'s tokens, or their sum / `num_tokens` (a split batch's global count)."""
    n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=entropies.dtype)
    return (entropies * mask).sum() / n.clamp(min=1.0)


@dataclass
class AdaptiveEntropy:
    """Skywork-OR1's adaptive entropy control, as TRL 1.16 steps it: after each optimizer step, the
    coefficient moves by `delta` (within [coef_min, coef_max]) up if the step's entropy was ≤ `target`,
    down otherwise; the bonus a step applies is the coefficient *before* that update, and only when the
    previous step's entropy was ≤ target (none before any measurement)."""
    coef: float = 0.0
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf

    def coef_to_apply(self) -> float:
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, world_entropy: float) -> float:
        """`world_entropy`: the step's mean entropy over the tokens the bonus acts on, all ranks."""
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = world_entropy
        return self.coef


def _nan_extreme(x, fn):  # TRL's nanmin / nanmax: a sequence with no tokens has a NaN mean
    x = x[~torch.isnan(x)]
    return fn(x).item() if x.numel() else math.nan


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str = "dapo",
              epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              max_completion_length: int | None = None, num_active_tokens: float | None = None,
              kl_ratio_correction: bool = False, importance_sampling_level: str = "token",
              delta: float | None = None, sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
              vespo_lambda_neg: float = 2.0, off_policy_mask_threshold: float | None = None,
              entropies=None, top_entropy_quantile: float = 1.0, entropy_threshold_value=None,
              entropy_coef: float = 0.0, num_entropy_tokens: float | None = None):
    """GRPO loss of per-token log-probs (B, T) under the policy, the sampling (old) policy and the
    reference (ignored when beta=0); `advantages` (B,); `mask` (B, T) marks completion tokens.
    `max_completion_length` is dr_grpo's constant (default T); `num_active_tokens` is the dapo / cispo /
    vespo denominator, the active tokens of the whole global batch (default: this batch's).
    `kl_ratio_correction` multiplies k3 by the ratio π_θ/π_old, which makes its gradient the unbiased
    reverse-KL gradient when samples come from π_old (DeepSeek-V3.2, 2025; TRL's default).
    `importance_sampling_level="sequence"` is GSPO (Zheng et al. 2025): one ratio per sequence, the
    geometric mean of its token ratios (with loss_type in SEQUENCE_OK only). `delta` caps the
    unclipped ratio from above too (two-sided clipping, INTELLECT-2, Prime Intellect 2025; clipped
    surrogates only). For cispo, `epsilon_high` is the cap ε_max on the ratio itself (TRL's reading).
    `off_policy_mask_threshold` drops negative-advantage sequences that drifted (DeepSeek-V3.2, 2025).
    `entropies` (B, T), the policy's entropy per position, are needed for `top_entropy_quantile` < 1
    (threshold from this batch, or `entropy_threshold_value` computed over a whole split batch) and
    `entropy_coef` ≠ 0 (the bonus's denominator: `num_entropy_tokens`, default this batch's kept tokens).
    Returns (loss, metrics) with the KL, the clip ratios (or the loss type's own statistic), the entropy
    and, with the bonus, the policy loss without it."""
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {TRL_LOSS_TYPES}")
    if logps.shape != mask.shape or old_logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and "
                         f"mask {tuple(mask.shape)} must have one shape")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: expected 'token' or 'sequence'")
    if importance_sampling_level == "sequence" and loss_type not in SEQUENCE_OK:
        raise ValueError(f"importance_sampling_level='sequence' (GSPO) needs loss_type in {SEQUENCE_OK}, "
                         f"not {loss_type!r}")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile}: expected a value in [0, 1]")
    if entropies is None and (top_entropy_quantile < 1.0 or entropy_coef != 0.0):
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile}, entropy_coef={entropy_coef} need "
                         "entropies (B, T)")
    if entropies is not None and entropies.shape != mask.shape:
        raise ValueError(f"entropies {tuple(entropies.shape)} must have mask's shape {tuple(mask.shape)}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    keep = None  # the high-entropy tokens, when the policy term keeps only those
    if top_entropy_quantile < 1.0:
        thr = entropy_threshold(entropies, mask, top_entropy_quantile) if entropy_threshold_value is None \
            else entropy_threshold_value
        keep = high_entropy_mask(entropies, mask, thr)
    A = advantages.unsqueeze(1)
    token_log_ratio = logps - old_logps
    log_ratio = token_log_ratio
    if importance_sampling_level == "sequence":  # (B, 1): a sequence's tokens share one ratio
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1.0)).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if kl_ratio_correction:
            kl = kl * ratio
    if loss_type in CLIPPED:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        per_token = -torch.min(ratio * A, clipped * A)
    elif loss_type == "cispo":  # the weight is a constant: the gradient is sg(w)·A·∇log π_θ
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * A * logps
    elif loss_type == "sapo":  # σ' peaks at ratio 1 with slope 1 after the 4/τ rescale, like the unclipped ratio
        tau = torch.where(A > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    else:  # vespo
        phi = vespo_weights(token_log_ratio, mask, A, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        per_token = -phi * A * logps
    if off_policy_mask_threshold is not None:
        per_token = per_token * off_policy_mask(logps, old_logps, A, mask, off_policy_mask_threshold)
    if keep is not None:
        per_token = per_token * keep
    if beta != 0.0:
        per_token = per_token + beta * kl

    n_tokens = mask.sum()
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / n_tokens.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    elif loss_type == "luspo":  # a sequence's loss is its tokens' sum: long sequences weigh more
        loss = (per_token * mask).sum(1).mean()
    else:  # dapo, cispo, vespo
        denom = n_tokens if num_active_tokens is None else torch.as_tensor(num_active_tokens, dtype=logps.dtype)
        loss = (per_token * mask).sum() / denom.clamp(min=1.0)
    policy_loss = loss.detach()
    if entropy_coef != 0.0:  # not divided by the loss type's normaliser: one meaning for every type
        loss = loss - entropy_coef * entropy_bonus(entropies, mask if keep is None else mask * keep,
                                                   num_entropy_tokens)

    def token_mean(x):  # one value per sequence (GSPO, VESPO's φ): their mean
        if x.shape[1] == 1:
            return x.to(mask.dtype).mean().item()
        return ((x.to(mask.dtype) * mask).sum() / n_tokens.clamp(min=1.0)).item()

    metrics = {}
    if loss_type in CLIPPED:
        # Clipping only bites where the clipped term is the min: ratio below 1−ε with A<0, above 1+ε with A>0.
        low = (ratio < 1 - epsilon_low) & (A < 0)
        high = (ratio > 1 + epsilon_high) & (A > 0)
        metrics = {"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                   "clip_ratio/region_mean": token_mean(low | high)}
        # extremes over sequences of each sequence's clipped fraction (no clamp: an empty row is NaN, skipped)
        seq = (lambda x: x.to(mask.dtype).squeeze(1)) if ratio.shape[1] == 1 else \
            (lambda x: (x.to(mask.dtype) * mask).sum(1) / mask.sum(1))
        metrics["clip_ratio/low_min"] = _nan_extreme(seq(low), torch.min)
        metrics["clip_ratio/high_max"] = _nan_extreme(seq(high), torch.max)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = token_mean((ratio > epsilon_high) & (A > 0))
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = token_mean(phi)
    if beta != 0.0:
        metrics["kl"] = token_mean(kl.detach())
    if entropies is not None:
        metrics["entropy"] = token_mean(entropies.detach())
    if entropy_coef != 0.0:
        metrics["policy_loss"] = policy_loss.item()
    return loss, metrics
