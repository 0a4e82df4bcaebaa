"""Rank functions for the launcher tests (spawned ranks need an importable module)."""
import time

import torch
import torch.distributed as dist


def all_reduce_rank(x):
    t = torch.tensor([float(dist.get_rank() + x)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def raise_on_rank(bad_rank):
    if dist.get_rank() == bad_rank:
        raise ValueError(f"boom on rank {bad_rank}")
    dist.barrier()  # the others wait here for a rank that never comes
    return "unreachable"


def hang(seconds):
    time.sleep(seconds)
    return "woke"


def time_all_reduce_one_slow_rank(slow_rank, delay_s, sizes, variants, repeat, budget_s):
    """time_all_reduce where `slow_rank` spends `delay_s` more inside every timed repetition,
    after its collective has finished (so the other ranks' clocks do not see the delay).
    Returns (rank, {variant: calls made, warm-up included}, the times)."""
    from dpo_lab.parallel import demos
    calls = {}

    def slowed(name, fn):
        def run(x):
            calls[name] = calls.get(name, 0) + 1
            fn(x)
            if dist.get_rank() == slow_rank:
                time.sleep(delay_s)
        return run
    # A copy per rank process (spawned): only this rank's variants are slowed.
    demos.VARIANTS = {name: slowed(name, fn) for name, fn in demos.VARIANTS.items()}
    times = demos.time_all_reduce(sizes, variants, repeat=repeat, warmup=1, budget_s=budget_s)
    return dist.get_rank(), calls, times


def call_with_rank(f):
    return f(dist.get_rank())
