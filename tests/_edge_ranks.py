"""Rank functions for tests/test_edges.py: each feeds a library a bad input on some rank.

Every rank function re-raises through `_all_raise`, which first meets the other ranks at a
barrier: the barrier completes only if every rank raised at the same point, so a check that
raises on one rank while the others wait (a hang) shows up as a timeout, not as a pass.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn


@contextlib.contextmanager
def _all_raise():
    try:
        yield
    except ValueError:
        dist.barrier()
        raise


def expert_unequal_tokens(tokens_per_rank: int = 8):
    """Rank r routes tokens_per_rank + r tokens."""
    from dpo_lab.parallel.expert import MoE, ExpertParallelMoE
    torch.manual_seed(0)
    ep = ExpertParallelMoE(MoE(dim=8, hidden=16, n_experts=4, k=2))
    with _all_raise():
        ep(torch.randn(tokens_per_rank + dist.get_rank(), 8))
    return "no error"


def pipeline_bad_microbatches(case: str):
    """2 stages, 1F1B over 4 micro-batches of (2, 8) tokens; `case` spoils them on rank 1 only,
    so that only a check agreed over the ranks can make rank 0 raise too."""
    from dpo_lab.arch.transformer import TinyTransformer
    from dpo_lab.parallel.pipeline import run_pipeline, split_model
    from dpo_lab.parallel.schedules import make_schedule
    rank, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    chunks = {0: split_model(TinyTransformer(32, 16, 2, 2), p)[rank]}
    m = 4
    mbs = [torch.randint(0, 32, (2, 8)) for _ in range(m)]
    tgts = [torch.randint(0, 32, (2, 8)) for _ in range(m)]
    schedule = make_schedule("1f1b", p, m)
    if rank == 1:
        if case == "shape":
            mbs[2] = torch.randint(0, 32, (3, 8))
        elif case == "count":
            schedule = make_schedule("1f1b", p, m + 1)
        elif case == "targets":
            tgts[1] = tgts[1][:, :7]
    with _all_raise():
        run_pipeline(chunks, schedule, mbs, tgts)
    return "no error"


def fsdp_low_precision(bad_rank: int, dtype=torch.bfloat16):
    from dpo_lab.parallel.fsdp import FullyShardedDataParallel
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if dist.get_rank() == bad_rank:
        net[1].to(dtype)
    with _all_raise():
        FullyShardedDataParallel(net)
    return "no error"
