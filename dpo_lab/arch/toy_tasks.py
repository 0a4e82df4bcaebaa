"""Synthetic sequence tasks and a minimal training loop for the architecture lessons.

Two tasks, both generated on the fly from a seed (no downloads):
  Markov   next-token prediction on a random sparse Markov chain; the best possible loss is the
           chain's entropy rate, a model that learned nothing scores ≈ ln(vocab).
  Copy     "a b c … SEP a b c …": the second half can only be predicted by attending back,
           so it exercises attention (and its KV heads).
"""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class MarkovTask:
    """Each token has `branching` possible successors with random probabilities."""

    def __init__(self, vocab_size: int = 64, branching: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        logits = torch.full((vocab_size, vocab_size), float("-inf"))
        for i in range(vocab_size):
            succ = torch.randperm(vocab_size, generator=g)[:branching]
            logits[i, succ] = torch.randn(branching, generator=g)
        self.P = logits.softmax(-1)
        self.stationary = self._stationary()

    def _stationary(self):
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size)
        for _ in range(500):
            pi = pi @ self.P
        return pi

    def entropy_rate(self) -> float:
        """The lowest achievable mean next-token loss (nats)."""
        h = -(self.P * self.P.clamp_min(1e-30).log()).sum(-1)
        return float((self.stationary * h).sum())

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.multinomial(self.stationary, batch_size, replacement=True, generator=generator)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.multinomial(self.P[tokens[:, t]], 1, generator=generator)[:, 0]
        return tokens[:, :-1], tokens[:, 1:], None  # inputs, targets, loss mask (all positions)


class CopyTask:
    """Random tokens, a separator, then the same tokens again; loss on the copy only."""

    def __init__(self, vocab_size: int = 32, length: int = 12):
        self.vocab_size, self.length, self.sep = vocab_size, length, vocab_size - 1

    def batch(self, batch_size: int, seq_len: int | None, generator: torch.Generator):
        src = torch.randint(0, self.vocab_size - 1, (batch_size, self.length), generator=generator)
        sep = torch.full((batch_size, 1), self.sep)
        seq = torch.cat([src, sep, src], dim=1)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        mask[:, self.length:] = True  # predict the copied half (from the separator on)
        return inputs, targets, mask


def lm_loss(model, inputs, targets, mask=None):
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return loss.mean()
    mask = mask.reshape(-1).float()
    return (loss * mask).sum() / mask.sum()


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def train(model, task, steps: int, lr: float = 1e-3, warmup: int = 0, batch_size: int = 32,
          seq_len: int = 32, seed: int = 0, clip: float | None = 1.0, desc: str = "train",
          progress: bool = True) -> list[float]:
    """AdamW on fresh batches; returns the loss per step (stops early, padding with nan, on nan/inf)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, lr, warmup)
        inputs, targets, mask = task.batch(batch_size, seq_len, g)
        loss = lm_loss(model, inputs, targets, mask)
        if not torch.isfinite(loss):
            losses += [math.nan] * (steps - step)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, task, batches: int = 8, batch_size: int = 64, seq_len: int = 32, seed: int = 1234):
    """Mean loss on held-out batches (a fixed seed, so every model sees the same data)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    total = sum(lm_loss(model, *task.batch(batch_size, seq_len, g)).item() for _ in range(batches))
    return total / batches
