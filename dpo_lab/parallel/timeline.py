"""A timeline of one data-parallel step: when each bucket's gradients were ready, when its
all-reduce was launched and when it completed, against forward and backward, on every rank.

    out = launch(dp_step_timeline, 2, kwargs=dict(steps=3))   # out[0]: every rank's events
    plot_timeline(ax, out[0]["steps"]["overlap"][-1], len(out[0]["buckets"]))

DDP's overlap (Li et al. 2020, *PyTorch Distributed*, VLDB) is that a bucket's all-reduce is
launched from the backward hook that completes the bucket, so it runs while autograd computes the
gradients of earlier layers; mode "after_backward" launches every bucket once backward is done.
Times are `time.perf_counter_ns()`, on the rank's main thread except "done", which a completion
callback (`work.get_future().then`) records on the communication thread. Ranks on one host share
that clock (CLOCK_MONOTONIC), so their rows are put on one time axis, starting when the first rank
left the barrier before the step; ranks on different hosts are each timed from their own barrier
exit (aligned only to within its skew).
"""
import re
import socket
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
            recorded[mode].append((rec.t0, rec.wait()))
    gathered = [None] * n if rank == 0 else None
    dist.gather_object((socket.gethostname(), recorded), gathered, dst=0)
    if rank:
        return None
    one_host = len({host for host, _ in gathered}) == 1
    out = {mode: [] for mode in modes}
    for mode in modes:
        for s in range(steps):
            starts = [gathered[r][1][mode][s][0] for r in range(n)]
            shift = [t0 - min(starts) if one_host else 0 for t0 in starts]
            out[mode].append([[(k, b, t + shift[r]) for k, b, t in gathered[r][1][mode][s][1]]
                              for r in range(n)])
    return {"buckets": buckets, "one_clock": one_host,
            "bucket_layers": [[layer_of(x, n_layers) for x in b] for b in buckets], "steps": out}


def marks(events) -> dict:
    """{kind: ns} of the step marks and {(kind, bucket): ns} of the bucket events of one rank."""
    return {(k if b is None else (k, b)): t for k, b, t in events}


def step_ms(ranks_events) -> float:
    """Forward start to gradients synchronised, slowest rank, in ms."""
    return max(marks(ev)["sync_end"] - marks(ev)["forward_start"] for ev in ranks_events) / 1e6


def plot_timeline(ax, ranks_events, n_buckets: int, title: str = "") -> None:
    """Gantt chart: per rank a compute row (forward, backward) and, below it, a communication row
    with one lane per bucket (bucket 0 on top): a bar from launch to completion, a black tick where
    the bucket's gradients were all ready, a dashed green mark where the rank's gradients were
    synchronised."""
    comm = ["tab:orange", "tab:red"]  # alternate, so neighbouring buckets stay apart
    lane = 1.2 / n_buckets
    yticks, ylabels = [], []
    for r, events in enumerate(ranks_events):
        m = marks(events)
        base = 2.4 * (len(ranks_events) - 1 - r)  # rank 0 on top
        y_comp = base + 1.75
        for kind, (a, b), colour in (("forward", ("forward_start", "backward_start"), "0.75"),
                                      ("backward", ("backward_start", "backward_end"), "tab:blue")):
            ax.broken_barh([(m[a] / 1e6, (m[b] - m[a]) / 1e6)], (y_comp - 0.3, 0.6), color=colour,
                           label=kind if r == 0 else None)
        for b in range(n_buckets):
            y = base + 1.2 - (b + 1) * lane
            start, end = m[("launch", b)] / 1e6, m[("done", b)] / 1e6
            ax.broken_barh([(start, max(end - start, 1e-3))], (y + 0.1 * lane, 0.8 * lane), color=comm[b % 2],
                           label=f"all-reduce in flight (launch to completion), {'even' if b % 2 == 0 else 'odd'} buckets"
                           if r == 0 and b < 2 else None)
            ax.plot([m[("ready", b)] / 1e6] * 2, [y, y + lane], color="k", lw=1.5,
                    label="bucket's gradients all ready" if r == 0 and b == 0 else None)
        ax.plot([m["sync_end"] / 1e6] * 2, [base - 0.1, base + 2.15], color="tab:green", ls="--", lw=1.2,
                label="gradients synchronised" if r == 0 else None)
        yticks += [base + 0.6, y_comp]
        ylabels += [f"rank {r} all-reduce\n(bucket 0 on top)", f"rank {r} compute"]
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.set_ylim(-0.3, 2.4 * len(ranks_events))
    ax.set_xlabel("time since the step started (ms)")
    ax.set_xlim(left=0)
    if title:
        ax.set_title(title, fontsize=10)
