"""Rank functions of the collectives lesson and benchmark (spawned ranks need an importable module).

Each is started with `launch(fn, world_size, ...)` and returns plain lists / floats to the caller.
"""
import statistics
import time

import torch
import torch.distributed as dist

from dpo_lab.parallel.collectives import naive_all_reduce, recursive_doubling_all_reduce, ring_all_reduce
from dpo_lab.parallel.launch import rank_device
from dpo_lab.parallel.zero import all_gather_single, reduce_scatter_single


def collectives_tour(numel: int = 4) -> dict:
    """Run the seven collectives on small tensors; {op: (before, after)} of this rank's values."""
    r, n, dev = dist.get_rank(), dist.get_world_size(), rank_device()
    base = lambda k=numel: torch.arange(k, dtype=torch.float32, device=dev) + 10 * r  # rank r: 10r, 10r+1, ...
    out = {}

    x = base(); before = x.tolist(); dist.broadcast(x, src=0); out["broadcast"] = (before, x.tolist())
    x = base(); before = x.tolist(); dist.reduce(x, dst=0)
    out["reduce"] = (before, x.tolist() if r == 0 else [])  # only dst's result is defined
    x = base(); before = x.tolist(); dist.all_reduce(x); out["all_reduce"] = (before, x.tolist())
    x = base(1); y = torch.empty(n, device=dev); all_gather_single(y, x); out["all_gather"] = (x.tolist(), y.tolist())
    x = base(n); y = torch.empty(1, device=dev); reduce_scatter_single(y, x); out["reduce_scatter"] = (x.tolist(), y.tolist())
    x = base(n); y = torch.empty(n, device=dev); dist.all_to_all_single(y, x); out["all_to_all"] = (x.tolist(), y.tolist())
    # send/recv: every rank passes its tensor to the right neighbour around a ring.
    x = base(); y = x.clone()  # one rank: it is its own neighbour, nothing to send
    if n > 1:
        ops = [dist.P2POp(dist.isend, x, (r + 1) % n), dist.P2POp(dist.irecv, y, (r - 1) % n)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    out["send_recv"] = (x.tolist(), y.tolist())
    return out


def check_all_reduce(numels, seed: int = 0) -> dict:
    """Max |hand-written − dist.all_reduce| per (algorithm, numel), and the bytes each sent."""
    r = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 1000 + r)
    out = {}
    for numel in numels:
        x = torch.randn(numel, generator=g).to(rank_device())
        ref = x.clone(); dist.all_reduce(ref)
        for name, fn in HAND_WRITTEN.items():
            y = x.clone()
            sent = fn(y)
            out[(name, numel)] = {"max_abs_diff": (y - ref).abs().max().item() if numel else 0.0,
                                  "bytes_sent": sent}
    return out


def _native_all_reduce(t):
    dist.all_reduce(t)


HAND_WRITTEN = {"naive": naive_all_reduce, "ring": ring_all_reduce, "doubling": recursive_doubling_all_reduce}
# Looked up at call time, so a test can slow one rank's variant down.
VARIANTS = {"native": _native_all_reduce, **HAND_WRITTEN}


def _max_over_ranks(value: float, dev) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _max_over_ranks_each(values: list, dev) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_all_reduce(sizes_bytes, variants=("native", "ring"), repeat: int = 5, warmup: int = 1,
                    budget_s: float = 1.0, samples: bool = False) -> dict:
    """Median seconds of one all-reduce of `size` bytes of fp32, per (variant, size); with
    `samples=True` every repetition's time instead (a list, for error bars).

    `native` is the backend's own all_reduce (gloo or nccl). A repetition runs every variant once,
    in turn, each after a barrier: a burst of load from another process then hits all variants
    alike, so their ratio stays fair on a shared machine (timing variant after variant, a burst
    lands on one of them). A repetition's time is its slowest rank's (the collective is done when
    its slowest rank is). A size stops repeating once the slowest rank has used
    `budget_s` per variant (big messages are slow on CPU), after at least 2 and at most `repeat`
    repetitions."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown all-reduce variant(s) {unknown}; have {sorted(VARIANTS)}")
    dev = rank_device()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {}
    for size in sizes_bytes:
        x = torch.ones(max(1, size // 4), device=dev)
        for v in variants:
            for _ in range(warmup):
                VARIANTS[v](x)
        per_variant = {v: [] for v in variants}
        times, spent, reps = [], 0.0, 0
        while reps < repeat and (spent < budget_s * len(variants) or reps < 2):
            for v in variants:
                fn = VARIANTS[v]
                x.fill_(1.0)
                sync(); dist.barrier()
                t0 = time.perf_counter()
                fn(x); sync()
                per_variant[v].append(time.perf_counter() - t0)
                times.append(per_variant[v][-1])
            reps += 1
            # The stop decision must be the same on every rank: each rank's own clock would
            # let one rank leave the loop (for the all_reduce below) while another waits in
            # the next barrier, and both hang. So every rank uses the slowest rank's total.
            spent = _max_over_ranks(sum(times), dev)
        for v in variants:
            slowest = _max_over_ranks_each(per_variant[v], dev)
            out[(v, size)] = slowest if samples else statistics.median(slowest)
    return out


def lesson04(tour_numel, check_numels, time_sizes, repeat, seed=0, budget_s=1.0,
             variants=("native", "ring", "doubling")) -> dict:
    """One launch for the notebook: the tour, the correctness checks and the timings (every
    repetition's, so the notebook can draw error bars)."""
    out = {"tour": collectives_tour(tour_numel), "check": check_all_reduce(check_numels, seed)}
    out["times"] = time_all_reduce(time_sizes, variants, repeat=repeat, budget_s=budget_s,
                                   samples=True) if time_sizes else {}
    return out
