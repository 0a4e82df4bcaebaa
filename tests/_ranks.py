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
