"""Rank functions for the data-parallel correctness and clean-exit tests (spawned ranks need an
importable module). The single-process references here use plain torch only."""
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dpo_lab.parallel.data_parallel import DataParallel
from dpo_lab.parallel.zero import ShardedOptimizer

DIM, ROWS = 8, 4  # rows per rank


class Branchy(nn.Module):
    """`branch` runs only when asked: a parameter some ranks use on a step and others do not.
    `inp` has the shape of `branch`, so all-reduces paired out of order fail silently."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.branch = nn.Linear(DIM, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, 1)

    def forward(self, x, use_branch: bool):
        h = torch.tanh(self.inp(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.out(torch.tanh(self.mid(h)))


def make_branchy(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return Branchy()


def branchy_data(steps, world_size, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(steps, world_size * ROWS, DIM, generator=g), torch.randn(steps, world_size * ROWS, 1, generator=g)


def branchy_single(uses, lr=0.05) -> dict:
    """Reference: one process; step s's loss is the mean over ranks r of rank r's mean loss, with
    the branch taken iff uses[s][r]. A parameter no rank used gets no gradient (AdamW skips it)."""
    world_size = len(uses[0])
    model = make_branchy()
    xs, ys = branchy_data(len(uses), world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for s in range(len(uses)):
        loss = sum(F.mse_loss(model(xs[s, r * ROWS:(r + 1) * ROWS], uses[s][r]), ys[s, r * ROWS:(r + 1) * ROWS])
                   for r in range(world_size)) / world_size
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _wrap(strategy, model, lr):
    if strategy == "ddp":
        m = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return m, torch.optim.AdamW(m.parameters(), lr=lr), None
    if strategy == "zero2":
        for t in model.parameters():
            dist.broadcast(t.data, src=0)
        opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=lr)
        return model, opt, opt
    bucket = 300 / 2**20 if strategy.startswith("dp_bucketed") else None  # a few parameters a bucket
    m = DataParallel(model, bucket_size_mb=bucket, find_unused_parameters=strategy.endswith("unused"))
    return m, torch.optim.AdamW(m.parameters(), lr=lr), m


def branchy_train(jobs, lr=0.05) -> list:
    """Rank function: for each (strategy, uses) in jobs, {name: final parameter} after training
    Branchy with the branch taken on step s iff uses[s][rank]."""
    rank, n = dist.get_rank(), dist.get_world_size()
    out = []
    for strategy, uses in jobs:
        xs, ys = branchy_data(len(uses), n)
        model = make_branchy(seed=rank * 100)  # different on every rank: the wrappers broadcast
        wrapped, opt, syncer = _wrap(strategy, model, lr)
        for s in range(len(uses)):
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            F.mse_loss(wrapped(xs[s, rows], uses[s][rank]), ys[s, rows]).backward()
            if syncer is not None:
                syncer.finish_gradient_synchronization()
            opt.step()
            opt.zero_grad()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def accumulate_train(strategies, steps=2, micro=2, lr=0.05) -> dict:
    """Rank function: gradient accumulation over `micro` micro-batches per step, the first ones
    inside no_sync(). Equal to one process on the whole batch (see accumulate_single)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    xs, ys = branchy_data(steps, n)
    out = {}
    for strategy in strategies:
        model = make_branchy(seed=rank * 100)
        wrapped, opt, syncer = _wrap(strategy, model, lr)
        for s in range(steps):
            rows = torch.arange(rank * ROWS, (rank + 1) * ROWS).chunk(micro)
            for j, idx in enumerate(rows):
                last = j == micro - 1
                if strategy == "zero2":  # ZeRO-2 accumulates the reduced pieces instead
                    (F.mse_loss(wrapped(xs[s, idx], True), ys[s, idx]) / micro).backward()
                    opt.finish_gradient_synchronization()
                    continue
                with wrapped.no_sync() if not last else nullcontext():
                    (F.mse_loss(wrapped(xs[s, idx], True), ys[s, idx]) / micro).backward()
            if syncer is not None and strategy != "zero2":
                syncer.finish_gradient_synchronization()
            opt.step()
            opt.zero_grad()
        out[strategy] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def accumulate_single(world_size, steps=2, lr=0.05) -> dict:
    model = make_branchy()
    xs, ys = branchy_data(steps, world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for s in range(steps):
        F.mse_loss(model(xs[s], True), ys[s]).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def two_backwards_without_sync(strategy: str):
    """Rank function: the mistake no_sync() exists for. Must raise, not return."""
    xs, ys = branchy_data(1, dist.get_world_size())
    model, opt, syncer = _wrap(strategy, make_branchy(), lr=0.05)
    for _ in range(2):
        F.mse_loss(model(xs[0, :ROWS], True), ys[0, :ROWS]).backward()
    syncer.finish_gradient_synchronization()
    return "no error"


# --- vocabulary-parallel cross-entropy ---------------------------------------------------------

VOCAB = 12  # divisible by 1, 2 and 3 ranks


def vocab_ce_against_torch() -> dict:
    """Rank function: {case: (max |loss − torch|, max |grad − torch|, loss is nan, torch is nan)}
    for vocab_parallel_cross_entropy on this rank's shard vs F.cross_entropy on the full logits."""
    from dpo_lab.parallel.tensor import vocab_parallel_cross_entropy
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4, 3, VOCAB, generator=g) * 3
    target = torch.randint(0, VOCAB, (4, 3), generator=g)
    target[0, 1] = target[2, 0] = target[3, 2] = -100
    cases = {"mixed": target, "none_ignored": target.clamp(min=0), "all_ignored": torch.full_like(target, -100),
             "custom_index": target.masked_fill(target == -100, 7)}
    out = {}
    for name, t in cases.items():
        for reduction in ("mean", "sum", "none"):
            ignore = 7 if name == "custom_index" else -100
            ref_logits = full.clone().requires_grad_()
            ref = F.cross_entropy(ref_logits.flatten(0, 1), t.flatten(), reduction=reduction, ignore_index=ignore)
            ref.sum().backward()
            shard = full.chunk(n, -1)[rank].clone().requires_grad_()
            got = vocab_parallel_cross_entropy(shard, t, reduction=reduction, ignore_index=ignore)
            got.sum().backward()
            ref_grad = ref_logits.grad.chunk(n, -1)[rank]
            out[(name, reduction)] = ((got.flatten() - ref.flatten()).abs().nan_to_num(0).max().item(),
                                      (shard.grad - ref_grad).abs().nan_to_num(0).max().item(),
                                      bool(got.isnan().any()), bool(ref.isnan().any()),
                                      bool(shard.grad.isnan().any()), bool(ref_logits.grad.isnan().any()))
    return out


def vocab_ce_bad_targets() -> list:
    """Rank function: the error message each case raised on this rank (None: no error)."""
    from dpo_lab.parallel.tensor import vocab_parallel_cross_entropy
    rank, n = dist.get_rank(), dist.get_world_size()
    logits = torch.randn(4, VOCAB // n)
    good = torch.tensor([0, 5, -100, VOCAB - 1])
    cases = [torch.tensor([0, VOCAB, 3, 1]), torch.tensor([0, -5, 3, 1]),
             good.clone() if rank < n - 1 else torch.tensor([0, 1, 99, 2]),  # the last rank only
             good]
    out = []
    for t in cases:
        try:
            vocab_parallel_cross_entropy(logits, t)
            out.append(None)
        except ValueError as e:
            out.append(str(e))
    return out


# --- clean exit: ranks started by a harness of our own, not by dpo_lab.parallel.launch ------------

def clean_exit_rank(rank: int, world_size: int, init_file: str) -> None:
    """Train tied-weight and rank-dependent models through every wrapper, destroy the group, exit.
    Any collective left in flight or mismatched shows up as a non-zero exit code (-6: SIGABRT)."""
    from datetime import timedelta

    from dpo_lab.parallel.dp_training import train_strategies
    torch.set_num_threads(1)
    # A file rendezvous: no port to race for with other jobs on a busy machine.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    train_strategies(("dp", "dp_bucketed", "zero1", "zero2"), steps=2, batch=4, seq=8, tied=True)
    branchy_train([("dp_bucketed", [[True, False], [False, True]]), ("zero2", [[False, True]])])
    dist.destroy_process_group()


def clean_exit_main(runs: int, world_size: int = 2) -> None:
    """Start `runs` jobs of `world_size` spawned ranks one after another; print each exit code."""
    import multiprocessing as mp
    import shutil
    import tempfile
    from pathlib import Path

    ctx = mp.get_context("spawn")
    for _ in range(runs):
        tmp = tempfile.mkdtemp(prefix="dpo-lab-clean-exit-")
        init_file = str(Path(tmp) / "rendezvous")  # must not exist yet
        procs = [ctx.Process(target=clean_exit_rank, args=(r, world_size, init_file))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():  # a hang guard only
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
        print("exitcodes", *[p.exitcode for p in procs], flush=True)


if __name__ == "__main__":
    import sys
    clean_exit_main(int(sys.argv[1]))
