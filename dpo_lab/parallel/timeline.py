"""A timeline of one data-parallel step: when each bucket's gradients were ready, when its
all-reduce was launched and when it completed, against forward and backward, on every rank.

    out = launch(dp_step_timeline, 2, kwargs=dict(steps=3))   # out[0]: every rank's events
    plot_timeline(ax, out[0]["steps"]["overlap"][-1], len(out[0]["buckets"]))

DDP's overlap (Li et al. 2020, *PyTorch Distributed*, VLDB) is that a bucket's all-reduce is
launched from the backward hook that completes the bucket, so it runs while autograd computes the
gradients of earlier layers; mode "after_backward" launches every bucket once backward is done.
Times are `time.perf_counter_ns()`, on the rank's main thread except "done", which a completion
callback (`work.get_future().then`) records on the communication thread. Each rank's clock starts
when it leaves a barrier before the step, so rows of different ranks line up to within the
barrier's exit skew (tens of microseconds on one machine).
"""
import re
import time

import torch
import torch.distributed as dist

from dpo_lab.parallel.data_parallel import DataParallel
from dpo_lab.parallel.dp_training import lm_loss, make_batches, make_model

MODES = ("overlap", "after_backward")
STEP = ("forward_start", "backward_start", "backward_end", "sync_end")  # main-thread marks
BUCKET = ("ready", "launch", "done")


class Timeline:
    """Events (kind, bucket or None, ns since start) of one rank's step."""

    def __init__(self):
        self.t0 = time.perf_counter_ns()
        self.events: list[tuple[str, int | None, int]] = []
        self.futures = []

    def __call__(self, kind: str, bucket: int | None = None) -> None:
        self.events.append((kind, bucket, time.perf_counter_ns() - self.t0))

    def track(self, future) -> None:
        """Keep the completion callback's future, so `wait` can be sure every "done" is in."""
        self.futures.append(future)

    def wait(self) -> list:
        # work.wait() can return before the callback chained on its future has run
        torch.futures.wait_all(self.futures)
        return list(self.events)


def layer_of(name: str, n_layers: int) -> int:
    """Depth of a parameter of TinyTransformer: 0 the embedding, i+1 block i, n_layers+1 the top."""
    if name.startswith("embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else n_layers + 1


def dp_step_timeline(modes=MODES, steps=3, bucket_mb=0.25, model_cfg=None, batch=8, seq=32,
                     seed=0) -> dict | None:
    """Rank function. Runs `steps` steps of each mode, interleaved (so a change in machine load hits
    both alike), records every rank's events and gathers them to rank 0, which returns
    {"buckets": [[parameter name]], "bucket_layers": [[depth]], "steps": {mode: [[events of rank r]
    for each step]}}; other ranks return None."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; have {MODES}")
    rank, n = dist.get_rank(), dist.get_world_size()
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by world size {n}")
    models = {}
    for mode in modes:
        models[mode] = DataParallel(make_model(seed, model_cfg), bucket_size_mb=bucket_mb,
                                    overlap=mode == "overlap")
    dp = models[modes[0]]
    names = dict(zip(map(id, dp.params), dp.names))
    n_layers = len(dp.module.blocks)
    buckets = [[names[id(p)] for p in b] for b in dp.buckets]
    data = make_batches(steps, batch, seq, dp.module.embed.num_embeddings, seed)
    data = data[:, rank * batch // n:(rank + 1) * batch // n]
    recorded = {mode: [] for mode in modes}
    for tokens in data:
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            dist.barrier()  # every rank starts its clock together
            model.recorder = rec = Timeline()
            rec("forward_start")
            loss = lm_loss(model, tokens)
            rec("backward_start")
            loss.backward()
            rec("backward_end")
            model.finish_gradient_synchronization()
            rec("sync_end")
            model.recorder = None
            recorded[mode].append(rec.wait())
    gathered = [None] * n if rank == 0 else None
    dist.gather_object(recorded, gathered, dst=0)
    if rank:
        return None
    return {"buckets": buckets,
            "bucket_layers": [[layer_of(x, n_layers) for x in b] for b in buckets],
            "steps": {mode: [[gathered[r][mode][s] for r in range(n)] for s in range(steps)]
                      for mode in modes}}


def marks(events) -> dict:
    """{kind: ns} of the step marks and {(kind, bucket): ns} of the bucket events of one rank."""
    return {(k if b is None else (k, b)): t for k, b, t in events}


def step_ms(ranks_events) -> float:
    """Forward start to gradients synchronised, slowest rank, in ms."""
    return max(marks(ev)["sync_end"] - marks(ev)["forward_start"] for ev in ranks_events) / 1e6


def plot_timeline(ax, ranks_events, n_buckets: int, title: str = "") -> None:
    """Gantt chart: per rank a compute row (forward, backward) and a communication row with one
    lane per bucket (launch -> completed), a tick where the bucket's gradients were ready."""
    import matplotlib.colors as mcolors

    comm = ["tab:orange", "tab:red"]  # alternate, so neighbouring buckets stay apart
    yticks, ylabels = [], []
    for r, events in enumerate(ranks_events):
        m = marks(events)
        y_comp, y_comm = 2 * r + 1.0, 2 * r
        ax.broken_barh([(m["forward_start"] / 1e6, (m["backward_start"] - m["forward_start"]) / 1e6)],
                       (y_comp - 0.35, 0.7), color="0.75", label="forward" if r == 0 else None)
        ax.broken_barh([(m["backward_start"] / 1e6, (m["backward_end"] - m["backward_start"]) / 1e6)],
                       (y_comp - 0.35, 0.7), color="tab:blue", label="backward" if r == 0 else None)
        lane = 0.8 / n_buckets
        for b in range(n_buckets):
            y = y_comm + 0.4 - (b + 1) * lane  # bucket 0 on top
            start, end = m[("launch", b)] / 1e6, m[("done", b)] / 1e6
            ax.broken_barh([(start, max(end - start, 1e-3))], (y, lane * 0.9), color=comm[b % 2],
                           label=f"all-reduce in flight, {'even' if b % 2 == 0 else 'odd'} buckets"
                           if r == 0 and b < 2 else None)
            ax.plot([m[("ready", b)] / 1e6] * 2, [y, y + lane * 0.9], color="k", lw=1,
                    label="bucket's gradients ready" if r == 0 and b == 0 else None)
        ax.axvline(m["sync_end"] / 1e6, color=mcolors.to_rgba("tab:green", 0.8), ls="--", lw=1,
                   label="gradients synchronised" if r == 0 else None)
        yticks += [y_comm, y_comp]
        ylabels += [f"rank {r} all-reduce\n(bucket 0 on top)", f"rank {r} compute"]
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.set_xlabel("time since the step started (ms)")
    ax.set_xlim(left=0)
    if title:
        ax.set_title(title, fontsize=10)
