"""Pre-training, SFT and RLVR: three losses on one model, each a few lines (notebook 15).

All three are a weighted sum of log π(token | prefix); they differ in which tokens count and how
much each weighs:
- pre-training: every next token, weight 1 (next-token cross-entropy, Radford et al. 2018);
- SFT: only the response tokens of a demonstration, weight 1 (the prompt is given, not learnt);
- RLVR: the response tokens of the model's *own samples*, weighted by their reward (REINFORCE,
  Williams 1992), minus a baseline so that the weight has mean ~0 (DeepSeekMath, Shao et al. 2024,
  uses the group's mean reward: GRPO's advantage before the std division).
"""
import torch
import torch.nn.functional as F


def next_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(x_{t+1} | x_≤t) for t = 0..T−2: (B, T−1). The logits at t predict the token at t+1."""
    return logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def pretrain_loss(logits, input_ids, attention_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over every real (non-pad) target token."""
    on = attention_mask[:, 1:].float()
    return -(next_token_logps(logits, input_ids) * on).sum() / on.sum()


def sft_loss(logits, input_ids, response_mask) -> torch.Tensor:
    """Mean cross-entropy over response target tokens only: `response_mask` (B, T) is 1 on them."""
    on = response_mask[:, 1:].float()
    return -(next_token_logps(logits, input_ids) * on).sum() / on.sum()


def reinforce_loss(token_logps, mask, rewards, baseline: str | None = None, G: int | None = None) -> torch.Tensor:
    """−mean over sequences of (r − b)·Σ_t log π(o_t): its gradient is the policy gradient
    E[(r − b) ∇ log π(o)], unbiased for any b that does not depend on the sample itself.
    `baseline`: None (b = 0), "batch" (mean reward of the batch) or "group" (mean of each prompt's G
    samples, listed contiguously; GRPO's choice)."""
    if token_logps.shape != mask.shape or rewards.shape != token_logps.shape[:1]:
        raise ValueError(f"token_logps {tuple(token_logps.shape)}, mask {tuple(mask.shape)} and "
                         f"rewards {tuple(rewards.shape)}: need (B, T), (B, T) and (B,)")
    if baseline is None:
        weight = rewards
    elif baseline == "batch":
        weight = rewards - rewards.mean()
    elif baseline == "group":
        if not G or rewards.numel() % G:
            raise ValueError(f"baseline='group' needs G dividing the batch of {rewards.numel()}, got G={G}")
        weight = (rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)).view(-1)
    else:
        raise ValueError(f"baseline={baseline!r}: expected None, 'batch' or 'group'")
    seq_logp = (token_logps * mask.to(token_logps.dtype)).sum(1)
    return -(weight.detach() * seq_logp).mean()
