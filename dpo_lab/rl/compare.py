"""SFT vs DPO vs GRPO at equal compute: token accounting, pass@k, on-policy preference pairs.

Compute is counted in tokens through the model (Kaplan et al. 2020: a forward pass costs ~2N FLOPs
per token, a backward ~4N), so an arm's cost is `forward + 2·backward` token-passes. Rollouts count:
prefilling the prompt is P forward tokens, each decoded token one more (the KV cache makes it one
position, not the whole prefix). Padding is not counted (the tiny task pads by a token or two).
"""
import math
from dataclasses import dataclass

import torch


@dataclass
class Compute:
    forward: float = 0.0   # tokens through a forward pass (sampling, policy, reference)
    backward: float = 0.0  # tokens through a backward pass

    @property
    def total(self) -> float:
        """Forward-equivalent token passes: a backward costs two forwards."""
        return self.forward + 2 * self.backward

    def __add__(self, other: "Compute") -> "Compute":
        return Compute(self.forward + other.forward, self.backward + other.backward)


def grpo_compute(history: list[dict], prompts_per_step: int, G: int, prompt_tokens: int) -> Compute:
    """One GRPO run from its per-step `completion_tokens` (mean active tokens per sample): per sample,
    sampling P + C forward, then the policy's P + C forward and backward, and the reference's P + C
    forward (train.py logs the KL to the reference every step, even at beta = 0)."""
    c = Compute()
    for rec in history:
        if rec.get("step", 0) < 0:  # the evaluation record before training
            continue
        n, seq = prompts_per_step * G, prompt_tokens + rec["completion_tokens"]
        fwd = 3 * n * seq  # sampling, policy, reference
        c = c + Compute(fwd, n * seq)
    return c


def dpo_compute(rows_per_step: list[list[dict]], tokenizer) -> Compute:
    """DPO steps, each a list of pairs: chosen and rejected through the policy (forward and backward)
    and the reference (forward), each sequence prompt + answer + EOS."""
    c = Compute()
    for rows in rows_per_step:
        tok = sum(len(tokenizer(r["prompt"] + r[k], add_special_tokens=False)["input_ids"]) + 1
                  for r in rows for k in ("chosen", "rejected"))
        c = c + Compute(2 * tok, tok)
    return c


def sft_compute(rows, tokenizer, steps: int, batch_size: int, seed: int) -> Compute:
    """`models.train_sft`'s run with uniform draws (the SFT model every arm starts from): each step
    draws `batch_size` rows with the seeded generator it uses, and every token of prompt + completion
    + EOS goes forward and backward (the loss skips the prompt, the backward pass does not)."""
    lengths = [sum(len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) for k in ("prompt", "completion")) + 1
               for r in rows]
    gen = torch.Generator().manual_seed(seed)
    tok = sum(sum(lengths[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist())
              for _ in range(steps))
    return Compute(float(tok), float(tok))


def sampling_compute(n_samples: int, prompt_tokens: int, completion_tokens: float) -> Compute:
    """Decoding n samples with a KV cache: prefill plus one position per generated token."""
    return Compute(n_samples * (prompt_tokens + completion_tokens), 0.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n ≥ k samples with c correct
    (Chen et al. 2021, Codex, Eq. 1): 1 − C(n−c, k)/C(n, k), as a product to stay in range."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 ≤ c ≤ n and 1 ≤ k ≤ n")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))


def mine_pairs(prompts: list[str], completions: list[str], G: int, checker) -> list[dict]:
    """On-policy preference pairs from the model's own samples (G per prompt, contiguous): for each
    prompt whose group has both a completion the checker accepts and one it rejects, one pair (the
    first accepted as chosen, the first rejected as rejected). Groups all right or all wrong give none."""
    if len(prompts) != len(completions) or len(prompts) % G:
        raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions: need equal, N groups of G={G}")
    pairs = []
    for i in range(0, len(prompts), G):
        p = prompts[i]
        group = [c.strip().split("\n")[0].strip() for c in completions[i:i + G]]
        ok = [c for c in group if checker(p, c)]
        bad = [c for c in group if not checker(p, c) and c]
        if ok and bad:
            pairs.append({"prompt": p, "chosen": ok[0], "rejected": bad[0]})
    return pairs
