"""One 2-rank launch shared by the tests/test_strict_*.py files that need ranks: each part checks
a path the main tests leave alone (gradient accumulation, bucket boundaries, vocabulary shard
boundaries, large logits) against a single-process reference built from torch alone."""
import copy
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2


@functools.lru_cache(maxsize=None)
def strict_results() -> tuple:
    from dpo_lab.parallel import launch
    return tuple(launch(strict_rank, WORLD, timeout=180))


def strict_rank() -> dict:
    return {"dp_buckets": _dp_buckets(), "zero2_accum_err": _accumulation_err("zero2"),
            "fsdp_accum_err": _accumulation_err("fsdp"), **_vocab_parallel()}


def _dp_buckets() -> list:
    """Parameter sizes per bucket for 1 MiB buckets. Buckets fill in reverse parameter order:
    10 + 2^17 + (2^17 − 10) floats are exactly 1 MiB, so the last three share one bucket."""
    from dpo_lab.parallel.data_parallel import DataParallel
    sizes = [5, 2**17 - 10, 2**17, 10]
    module = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)
    return [[p.numel() for p in bucket] for bucket in DataParallel(module, bucket_size_mb=1).buckets]


def _accumulation_err(kind: str) -> float:
    """Two micro-batches per rank, a backward for each (ZeRO-2: and a sync), one SGD step: the
    parameters must equal one step on the global batch, i.e. both micro-batches' gradients add up."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(WORLD, 2, 5, 4)  # (rank, micro-batch, rows, features), the same on every rank
    y = torch.randn(WORLD, 2, 5, 3)
    model = copy.deepcopy(ref)
    if kind == "zero2":
        from dpo_lab.parallel.zero import ShardedOptimizer
        opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.5)
        wrapped = model
    else:
        from dpo_lab.parallel.fsdp import FullyShardedDataParallel
        wrapped = FullyShardedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    rank = dist.get_rank()
    for mb in range(2):
        F.mse_loss(wrapped(x[rank, mb]), y[rank, mb]).backward()
        if kind == "zero2":  # ZeRO-2 accumulates the reduced pieces: one sync per backward
            opt.finish_gradient_synchronization()
    if kind == "fsdp":
        wrapped.finish_gradient_synchronization()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    loss = sum(F.mse_loss(ref(x[r, mb]), y[r, mb]) for r in range(WORLD) for mb in range(2)) / WORLD
    loss.backward()
    ref_opt.step()
    ours = wrapped.gather_full_params() if kind == "fsdp" else dict(model.named_parameters())
    return max((ours[name] - p).abs().max().item() for name, p in ref.named_parameters())


def _vocab_parallel() -> dict:
    from dpo_lab.parallel.tensor import VocabParallelEmbedding, vocab_parallel_cross_entropy, vocab_range
    torch.manual_seed(1)
    embed = nn.Embedding(8, 4)
    tokens = torch.arange(8)  # every token, shard boundaries included
    lo, hi = vocab_range(16)
    logits = 100 * torch.randn(6, 16)  # large logits: exp overflows unless the global max is subtracted
    target = torch.tensor([0, 7, 8, 15, 3, 12])
    shard = logits[:, lo:hi].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    ours, ref = vocab_parallel_cross_entropy(shard, target), F.cross_entropy(full, target)
    ours.backward()
    ref.backward()
    return {"vocab_embed_all_tokens_err": (VocabParallelEmbedding(embed)(tokens) - embed(tokens)).abs().max().item(),
            "vocab_ce_large_logits_err": abs(ours.item() - ref.item()) / abs(ref.item()),
            "vocab_ce_large_logits_grad_err": (shard.grad - full.grad[:, lo:hi]).abs().max().item()}
