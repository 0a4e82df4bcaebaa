"""Pre-norm vs post-norm residual blocks as the stack gets deeper.

  post-norm (original Transformer):  x ← Norm(x + F(x))   every residual passes through a norm
  pre-norm  (GPT-2, Llama):          x ← x + F(Norm(x))   an identity path runs from input to output

We look at three things: the gradient norm of each layer's parameters at initialisation, short
training runs with and without learning-rate warm-up, each labelled trained / stalled / diverged,
and the largest peak learning rate at which each (placement, schedule) still trains, over seeds
(the experiment of Xiong et al. 2020, Fig. 1–3, at toy size).
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
        results[(placement, depth, schedule)] = run(placement, depth, schedule, steps, lr, warmup, task,
                                                    batch_size, seq_len, seed, **model_kw)
    return results


def run(placement: str, depth: int, schedule: str, steps: int, lr: float, warmup: int,
        task: MarkovTask, batch_size: int = 16, seq_len: int = 16, seed: int = 0, **model_kw) -> dict:
    """One training run: {"losses", "outcome", "final_loss", "progress"} (see `classify`)."""
    if placement not in ("pre", "post") or schedule not in ("nowarmup", "warmup"):
        raise ValueError(f"placement must be 'pre'/'post' and schedule 'nowarmup'/'warmup', "
                         f"got {placement!r}, {schedule!r}")
    model = build(depth, placement == "pre", vocab_size=task.vocab_size, seed=seed, **model_kw)
    losses = train(model, task, steps, lr=lr, warmup=warmup if schedule == "warmup" else 0,
                   batch_size=batch_size, seq_len=seq_len, seed=seed, clip=None, progress=False)
    outcome, final, progress = classify(losses, task)
    return {"losses": losses, "outcome": outcome, "final_loss": final, "progress": progress}


def largest_trained_lr(outcome_at, lrs):
    """(largest lr of the grid at which `outcome_at(lr)` is 'trained', {lr: outcome} of the runs made).

    Scans from the largest rate down and stops at the first that trains: the rates below it are
    not run (they are not needed for the answer). None if no rate of the grid trains.
    """
    if not lrs:
        raise ValueError("largest_trained_lr needs at least one learning rate, got an empty grid")
    tried = {}
    for lr in sorted(lrs, reverse=True):
        tried[lr] = outcome_at(lr)
        if tried[lr] == "trained":
            return lr, tried
    return None, tried


def lr_sweep(depth: int, lrs, seeds, steps: int, warmup: int, task: MarkovTask, batch_size: int = 16,
             seq_len: int = 16, **model_kw) -> dict:
    """Largest trained peak lr for every (placement, schedule) and seed.

    Returns {(placement, schedule): {"largest": [lr or None per seed],
                                     "runs": {(seed, lr): run(...) result}}}.
    A seed sets both the initial weights and the batches; the task stays the same.
    """
    out = {}
    cases = [(p, s) for p in ("pre", "post") for s in ("nowarmup", "warmup")]
    bar = tqdm(total=len(cases) * len(seeds), desc=f"lr sweep, depth {depth}", leave=False)
    for placement, schedule in cases:
        runs, largest = {}, []
        for seed in seeds:
            def outcome_at(lr, seed=seed):
                runs[(seed, lr)] = run(placement, depth, schedule, steps, lr, warmup, task,
                                       batch_size, seq_len, seed, **model_kw)
                return runs[(seed, lr)]["outcome"]
            largest.append(largest_trained_lr(outcome_at, lrs)[0])
            bar.update()
        out[(placement, schedule)] = {"largest": largest, "runs": runs}
    bar.close()
    return out

