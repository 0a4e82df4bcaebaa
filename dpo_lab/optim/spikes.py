"""Loss spikes on the tiny transformer of dpo_lab.arch: provoke them, detect them, cure them.

Detector: step t is a spike when loss_t > factor × median(previous `window` losses) (and any
non-finite loss is one); a run of consecutive spike steps is one spike event.

Runner: AdamW (dpo_lab.optim.AdamW) on the Markov next-token task, recording per step the loss,
the global gradient norm ‖g‖ before clipping, the norm actually applied, the update norm
‖θ_t − θ_{t−1}‖ and the learning rate. Provocations: a peak learning rate near the edge of
stability, a burst of bad batches (one token repeated: degenerate data), a tiny ε, a post-norm
stack. Cures (each an option): clipping by global norm, linear warm-up, lower peak lr, weight
decay, β2 / ε, skipping a batch whose loss is above the running median by `skip_factor`.
"""
import math
import statistics
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from dpo_lab.arch.toy_tasks import MarkovTask, lm_loss, warmup_lr
from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.optim.adamw import AdamW


def running_median(values, t: int, window: int) -> float | None:
    """Median of the finite values among values[t-window:t]; None before 3 of them exist."""
    prev = [v for v in values[max(0, t - window):t] if math.isfinite(v)]
    return statistics.median(prev) if len(prev) >= 3 else None


def spike_steps(losses, window: int = 10, factor: float = 1.5) -> list[int]:
    if window < 3 or factor <= 1:
        raise ValueError(f"need window >= 3 and factor > 1, got window={window}, factor={factor}")
    out = []
    for t, loss in enumerate(losses):
        med = running_median(losses, t, window)
        if not math.isfinite(loss) or (med is not None and loss > factor * med):
            out.append(t)
    return out


def count_spikes(losses, window: int = 10, factor: float = 1.5) -> int:
    """Spike events: runs of consecutive spike steps count once."""
    steps = spike_steps(losses, window, factor)
    return sum(1 for i, t in enumerate(steps) if i == 0 or steps[i - 1] != t - 1)


@dataclass(frozen=True)
class RunConfig:
    steps: int = 60
    lr: float = 1e-2
    warmup: int = 0
    clip: float | None = None          # max global gradient norm
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    skip_factor: float | None = None   # skip the update when loss > skip_factor × running median
    skip_window: int = 10
    prenorm: bool = True
    bad_batches: tuple = ()            # steps fed a degenerate batch (one token repeated)
    vocab: int = 64
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 16
    seq_len: int = 32
    extra: dict = field(default_factory=dict, compare=False)

    def but(self, **changes) -> "RunConfig":
        return replace(self, **changes)


def make_optimizer(model, cfg: RunConfig) -> AdamW:
    return AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                 weight_decay=cfg.weight_decay)


def _bad_batch(cfg, generator):
    """One random token repeated through each sequence: the kind of junk (a run of one character,
    a broken page) that data filters miss; far from the Markov data, so its gradient is large."""
    tok = torch.randint(0, cfg.vocab, (cfg.batch_size, 1), generator=generator)
    seq = tok.expand(cfg.batch_size, cfg.seq_len + 1)
    return seq[:, :-1], seq[:, 1:], None


def _global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def train_run(cfg: RunConfig, seed: int, progress: bool = False) -> dict:
    """One seeded run (the seed fixes the model init, the Markov chain and the batches)."""
    torch.manual_seed(seed)
    model = TinyTransformer(vocab_size=cfg.vocab, dim=cfg.dim, n_layers=cfg.n_layers,
                            n_heads=cfg.n_heads, prenorm=cfg.prenorm)
    task = MarkovTask(vocab_size=cfg.vocab, seed=seed)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, cfg)
    params = [p for p in model.parameters()]
    # a fixed clean batch, scored before every step: it shows damage to the model, where the
    # training loss also shows how odd the batch itself is (a bad batch always scores high)
    clean = task.batch(cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(seed + 10**6))
    trace = {k: [] for k in ("loss", "clean_loss", "grad_norm", "applied_grad_norm", "update_norm", "lr", "skipped")}
    for step in tqdm(range(cfg.steps), desc="run", leave=False, disable=not progress):
        lr = warmup_lr(step, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = _bad_batch(cfg, g) if step in cfg.bad_batches else task.batch(cfg.batch_size, cfg.seq_len, g)
        with torch.no_grad():
            trace["clean_loss"].append(lm_loss(model, *clean).item())
        loss = lm_loss(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = _global_norm(grads)
        if cfg.clip is not None and gnorm > cfg.clip:
            for gr in grads:
                gr.mul_(cfg.clip / (gnorm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
        med = running_median(trace["loss"], step, cfg.skip_window)
        skip = (cfg.skip_factor is not None and med is not None and loss.item() > cfg.skip_factor * med)
        skip = skip or not math.isfinite(gnorm)  # never apply a non-finite gradient
        before = [p.detach().clone() for p in params]
        if not skip:
            opt.step()
        trace["loss"].append(loss.item())
        trace["grad_norm"].append(gnorm)
        trace["applied_grad_norm"].append(0.0 if skip else _global_norm(grads))
        trace["update_norm"].append(_global_norm([p.detach() - b for p, b in zip(params, before)]))
        trace["lr"].append(lr)
        trace["skipped"].append(skip)
    with torch.no_grad():
        trace["final_loss"] = lm_loss(model, *clean).item()
    return trace


def compare(settings: dict, seeds, window: int = 10, factor: float = 1.5, on: str = "clean_loss",
            progress: bool = True) -> dict:
    """{name: {"spikes": [per seed], "final_loss": [per seed], "traces": [per seed]}}; spikes are
    counted on the clean-batch loss by default (damage to the model, not odd data)."""
    out = {}
    jobs = [(name, s) for name in settings for s in seeds]
    for name, seed in tqdm(jobs, desc="settings × seeds", disable=not progress):
        tr = train_run(settings[name], seed)
        row = out.setdefault(name, {"spikes": [], "final_loss": [], "traces": []})
        row["spikes"].append(count_spikes(tr[on], window, factor))
        row["final_loss"].append(tr["final_loss"])
        row["traces"].append(tr)
    return out
