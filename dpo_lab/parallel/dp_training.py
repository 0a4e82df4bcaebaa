"""Train the same tiny model the same way under every data-parallel strategy, and compare.

`train_single` is the reference: one process, the whole batch. `train_strategies` is a rank
function (start it with `launch`): each rank takes its rows of the batch and trains under each
strategy in turn, returning the final full parameters, the bytes it holds (parameters, gradients,
optimizer state, counted from the tensors) and the bytes its collectives sent per step.

Strategies: dp, dp_bucketed (ours), ddp (torch's DistributedDataParallel), zero1, zero2
(ShardedOptimizer), fsdp, fsdp_bf16 (our FullyShardedDataParallel), fsdp2 (torch's fully_shard).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.parallel.data_parallel import DataParallel
from dpo_lab.parallel.fsdp import FullyShardedDataParallel
from dpo_lab.parallel.zero import ShardedOptimizer, rank_memory

STRATEGIES = ("dp", "dp_bucketed", "ddp", "zero1", "zero2", "fsdp", "fsdp_bf16", "fsdp2")
TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, mlp_ratio=4)


class TiedLM(nn.Module):
    """Embedding and output head share one weight matrix (GPT-2's weight tying); a frozen bias."""

    def __init__(self, vocab_size=64, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.frozen = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.mlp(x) + self.frozen.to(x.dtype))


def make_model(seed: int, model_cfg: dict | None = None, tied: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if tied:
        return TiedLM(**(model_cfg or {}))
    return TinyTransformer(**(model_cfg or TINY))


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (steps, batch, seq + 1), generator=g)


def lm_loss(model, tokens) -> torch.Tensor:
    logits = model(tokens[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def train_single(steps=3, batch=8, seq=16, lr=1e-2, seed=0, model_cfg=None, tied=False) -> dict:
    """The reference run: one process, whole batch, AdamW. Returns {name: final parameter}."""
    model = make_model(seed, model_cfg, tied)
    vocab = (model_cfg or TINY)["vocab_size"] if not tied else model.embed.num_embeddings
    data = make_batches(steps, batch, seq, vocab, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for tokens in data:
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _wrap(strategy, model, lr, bucket_mb):
    params = lambda m: [p for p in m.parameters() if p.requires_grad]
    if strategy in ("dp", "dp_bucketed"):
        m = DataParallel(model, bucket_size_mb=bucket_mb if strategy == "dp_bucketed" else None)
        return m, torch.optim.AdamW(params(m), lr=lr), m
    if strategy == "ddp":
        m = nn.parallel.DistributedDataParallel(model)
        return m, torch.optim.AdamW(params(m), lr=lr), None
    if strategy == "zero1":
        m = DataParallel(model)
        return m, ShardedOptimizer(params(m), torch.optim.AdamW, lr=lr), m
    if strategy == "zero2":
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
        opt = ShardedOptimizer(params(model), torch.optim.AdamW, stage=2, lr=lr)
        return model, opt, opt
    if strategy in ("fsdp", "fsdp_bf16"):
        m = FullyShardedDataParallel(model, torch.bfloat16 if strategy == "fsdp_bf16" else None)
        return m, torch.optim.AdamW(m.parameters(), lr=lr), m
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(params(model), lr=lr), None
    raise ValueError(f"unknown strategy {strategy!r}; have {STRATEGIES}")


def _full_params(strategy, wrapped) -> dict:
    if strategy in ("fsdp", "fsdp_bf16"):
        frozen = {n: p.detach().clone() for n, p in wrapped.module.named_parameters()}
        return {**wrapped.gather_full_params(), **frozen}
    inner = getattr(wrapped, "module", wrapped)
    out = {}
    for n, p in inner.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # fsdp2 holds DTensor shards
        out[n] = p.detach().clone()
    return out


def train_strategies(strategies=STRATEGIES, steps=3, batch=8, seq=16, lr=1e-2, seed=0,
                     model_cfg=None, tied=False, bucket_mb=0.05) -> dict:
    """Rank function: {strategy: {'params', 'memory', 'bytes_per_step', 'loss'}} for this rank."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by world size {n}")
    out = {}
    for strategy in strategies:
        model = make_model(seed + rank * 1000 * (strategy != "fsdp2"), model_cfg, tied)
        if strategy == "fsdp2":  # fully_shard does not broadcast: start every rank from rank 0's weights
            model = make_model(seed, model_cfg, tied)
        vocab = model.embed.num_embeddings
        data = make_batches(steps, batch, seq, vocab, seed)[:, rank * batch // n:(rank + 1) * batch // n]
        wrapped, opt, syncer = _wrap(strategy, model, lr, bucket_mb)
        losses = []
        for i, tokens in enumerate(data):
            loss = lm_loss(wrapped, tokens)
            loss.backward()
            if syncer is not None:
                syncer.finish_gradient_synchronization()
            opt.step()
            losses.append(loss.item())
            if i < len(data) - 1:  # keep the last gradients: they are part of the memory measured
                opt.zero_grad()
        memory = rank_memory(wrapped, opt) if strategy not in ("ddp", "fsdp2") else None
        sent = getattr(syncer, "bytes_sent", 0) if syncer is not None else None
        if strategy == "zero1":
            sent = wrapped.bytes_sent + opt.bytes_sent
        out[strategy] = {"params": _full_params(strategy, wrapped), "memory": memory,
                         "bytes_per_step": None if sent is None else sent / steps, "loss": losses}
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a − b| over parameters present in both (names must match)."""
    missing = set(a) ^ set(b)
    if missing:
        raise KeyError(f"parameter names differ: {sorted(missing)[:5]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
