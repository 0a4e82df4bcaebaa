"""Pre-norm vs post-norm residual blocks as the stack gets deeper.

  post-norm (original Transformer):  x ← Norm(x + F(x))   every residual passes through a norm
  pre-norm  (GPT-2, Llama):          x ← x + F(Norm(x))   an identity path runs from input to output

We look at two things: the gradient norm of each layer's parameters at initialisation, and short
training runs with and without learning-rate warm-up, each labelled trained / stalled / diverged.
"""
import math

import torch
from tqdm.auto import tqdm

from dpo_lab.arch.toy_tasks import MarkovTask, lm_loss, train
from dpo_lab.arch.transformer import TinyTransformer


def build(depth: int, prenorm: bool, dim: int = 64, n_heads: int = 4, vocab_size: int = 64,
          norm: str = "layer", seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)  # same seed: pre- and post-norm models start from identical weights
    return TinyTransformer(vocab_size, dim, depth, n_heads, norm=norm, prenorm=prenorm)


def grad_norms_at_init(depth: int, prenorm: bool, task: MarkovTask, batch_size: int = 16,
                       seq_len: int = 16, seed: int = 0, **model_kw) -> list[float]:
    """‖∂loss/∂θ_layer‖ for each block (all its parameters together), one batch, at initialisation."""
    model = build(depth, prenorm, vocab_size=task.vocab_size, seed=seed, **model_kw)
    g = torch.Generator().manual_seed(seed)
    lm_loss(model, *task.batch(batch_size, seq_len, g)).backward()
    norms = []
    for block in model.blocks:
        sq = sum(p.grad.pow(2).sum() for p in block.parameters() if p.grad is not None)
        norms.append(float(sq) ** 0.5)
    return norms


def unigram_entropy(task: MarkovTask) -> float:
    """Loss of a model that ignores the context and predicts the token frequencies: a stall level."""
    pi = task.stationary
    return float(-(pi * pi.clamp_min(1e-30).log()).sum())


def classify(losses: list[float], task: MarkovTask, tail: float = 0.1, trained_at: float = 0.25):
    """('diverged'|'stalled'|'trained', final loss, progress).

    final = mean loss over the last `tail` of the run; progress = how much of the gap between the
    unigram entropy (no context used) and the entropy rate (the best possible) was closed.
    Diverged: the loss became nan/inf or ended above where it started (a non-finite final loss is
    reported as 10·ln V so that it can still be written as a figure).
    """
    n = max(1, int(len(losses) * tail))
    final = sum(losses[-n:]) / n
    if not math.isfinite(final) or final > losses[0]:
        return "diverged", (final if math.isfinite(final) else float(math.log(task.vocab_size) * 10)), 0.0
    h_uni, h_min = unigram_entropy(task), task.entropy_rate()
    progress = (h_uni - final) / (h_uni - h_min)
    return ("trained" if progress >= trained_at else "stalled"), final, progress


def depth_study(depths, steps: int, lr: float, warmup: int, task: MarkovTask, batch_size: int = 16,
                seq_len: int = 16, seed: int = 0, **model_kw) -> dict:
    """Train every (placement, depth, warm-up or not) for `steps`; returns curves and outcomes.

    Keys look like ("post", 48, "nowarmup") → {"losses", "outcome", "final_loss", "progress"}.
    """
    runs = [(p, d, s) for d in depths for p in ("pre", "post") for s in ("nowarmup", "warmup")]
    results = {}
    for placement, depth, schedule in tqdm(runs, desc="pre/post-norm runs", leave=False):
        model = build(depth, placement == "pre", vocab_size=task.vocab_size, seed=seed, **model_kw)
        losses = train(model, task, steps, lr=lr, warmup=warmup if schedule == "warmup" else 0,
                       batch_size=batch_size, seq_len=seq_len, seed=seed, clip=None, progress=False)
        outcome, final, progress = classify(losses, task)
        results[(placement, depth, schedule)] = {"losses": losses, "outcome": outcome,
                                                 "final_loss": final, "progress": progress}
    return results

