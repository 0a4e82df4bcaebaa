"""Tensor parallelism, Megatron style: split each weight matrix across the ranks of a group.

Two conjugate operators carry the communication (Shoeybi et al., 2019):

    f  identity forward,  all-reduce backward   (enters a tensor-parallel region)
    g  all-reduce forward, identity backward    (leaves it)

An MLP is column-parallel `up` (each rank holds a slice of the output features, so GELU runs
on its own slice) then row-parallel `down` (each rank holds a slice of the input features and
produces a partial sum): f before, g after, one all-reduce per direction. Attention splits the
heads the same way: q/k/v column-parallel by heads, o_proj row-parallel.

Every collective is recorded in COLLECTIVES so tests and notebooks can count them.
"""
import copy
import re
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dpo_lab.arch.attention import Attention
from dpo_lab.arch.transformer import MLP

COLLECTIVES: Counter = Counter()  # (op, "forward" | "backward") -> count, in this process


def record(op: str, direction: str) -> None:
    COLLECTIVES[(op, direction)] += 1


@contextmanager
def counted(counter: Counter):
    """with counted(COUNTER) as c: ... ; c holds what was added to COUNTER inside the block."""
    before = Counter(counter)
    seen = Counter()
    try:
        yield seen
    finally:
        seen.update(counter - before)


def count_collectives():
    """with count_collectives() as c: ... ; c[("all_reduce", "forward")] is what ran inside."""
    return counted(COLLECTIVES)


def tp_rank_size(group=None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(x, group, direction):
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    record("all_reduce", direction)
    return x


class _CopyToTP(torch.autograd.Function):
    """f: every rank needs the whole input forward; their input-gradients are partial sums."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, "backward"), None


class _ReduceFromTP(torch.autograd.Function):
    """g: the ranks' partial outputs are summed forward; the gradient of a sum is a copy."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group=None):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group=None):
    return _ReduceFromTP.apply(x, group)


def shard(t: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's contiguous slice of t along dim (t.shape[dim] must divide evenly)."""
    rank, size = tp_rank_size(group)
    if t.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {t.shape[dim]} over {size} ranks")
    return t.chunk(size, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y_r = x A_r: this rank holds output features [r·n/t, (r+1)·n/t) of the weight.

    copy_input=True applies f itself; a block that feeds several column layers from one input
    (q, k and v) applies f once and passes copy_input=False, so backward all-reduces once.
    """

    def __init__(self, linear: nn.Linear, group=None, copy_input: bool = True):
        super().__init__()
        self.group, self.copy_input = group, copy_input
        self.weight = nn.Parameter(shard(linear.weight.detach(), 0, group))
        self.bias = nn.Parameter(shard(linear.bias.detach(), 0, group)) if linear.bias is not None else None
        self.weight.tp_dim = 0
        if self.bias is not None:
            self.bias.tp_dim = 0

    def forward(self, x):
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r B_r: this rank holds input features [r·n/t, (r+1)·n/t) and adds its partial
    sum to the others' with g. The bias is added once, after the reduction."""

    def __init__(self, linear: nn.Linear, group=None, reduce_output: bool = True):
        super().__init__()
        self.group, self.reduce_output = group, reduce_output
        self.weight = nn.Parameter(shard(linear.weight.detach(), 1, group))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.weight.tp_dim = 1

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.reduce_output:
            return y  # partial sum; the caller reduces it, then adds self.bias once
        y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


class ParallelMLP(nn.Module):
    """Column-parallel up, GELU on the local slice, row-parallel down.

    enter/exit are the region's communication: f/g for tensor parallelism; sequence
    parallelism swaps in all-gather / reduce-scatter along the sequence (sequence.py).
    """

    def __init__(self, mlp: MLP, group=None, enter=copy_to_tp, exit=reduce_from_tp):
        super().__init__()
        self.group, self.enter, self.exit = group, enter, exit
        self.up = ColumnParallelLinear(mlp.up, group, copy_input=False)
        self.down = RowParallelLinear(mlp.down, group, reduce_output=False)

    def forward(self, x):
        x = self.enter(x, self.group)
        y = self.exit(self.down(F.gelu(self.up(x))), self.group)
        return y + self.down.bias  # after the reduction, so it is added once


class ParallelAttention(nn.Module):
    """Heads split across ranks: rank r owns query heads [r·H/t, ...) and the KV heads they use.

    GQA-aware: the KV heads are split too, so n_kv_heads must be divisible by t; each rank keeps
    H/t query heads and H_kv/t KV heads, i.e. the same group size as the unsplit layer.
    The local computation is the unsplit Attention module itself, with sharded projections.
    """

    def __init__(self, attn: Attention, group=None, enter=copy_to_tp, exit=reduce_from_tp):
        super().__init__()
        _, t = tp_rank_size(group)
        if attn.n_heads % t or attn.n_kv_heads % t:
            raise ValueError(f"n_heads={attn.n_heads} and n_kv_heads={attn.n_kv_heads} must both "
                             f"be divisible by the tensor-parallel size {t}")
        self.group, self.enter, self.exit = group, enter, exit
        dim = attn.q_proj.in_features
        local = Attention.__new__(Attention)
        nn.Module.__init__(local)
        local.n_heads, local.n_kv_heads = attn.n_heads // t, attn.n_kv_heads // t
        local.head_dim, local.rope_theta, local.layer_idx = attn.head_dim, attn.rope_theta, attn.layer_idx
        for name in ("q_proj", "k_proj", "v_proj"):  # heads are contiguous rows: split by rows
            setattr(local, name, ColumnParallelLinear(getattr(attn, name), group, copy_input=False))
        local.o_proj = RowParallelLinear(attn.o_proj, group, reduce_output=False)
        self.local, self.dim = local, dim

    def forward(self, x, cache=None):
        return self.exit(self.local(self.enter(x, self.group), cache), self.group)


class ParallelBlock(nn.Module):
    """A transformer Block with tensor-parallel attention and MLP (pre-norm only).

    sequence_parallel=False: input/output replicated (b, s, h); norms run on the whole sequence.
    sequence_parallel=True: input/output sharded along the sequence (b, s/t, h); norms and
    residuals run on the shard, and f/g become all-gather / reduce-scatter (sequence.py).
    """

    def __init__(self, block, group=None, sequence_parallel: bool = False):
        super().__init__()
        if not block.prenorm:
            raise ValueError("ParallelBlock supports pre-norm blocks only")
        if sequence_parallel:
            from dpo_lab.parallel.sequence import gather_from_sequence, reduce_scatter_to_sequence
            enter, exit = gather_from_sequence, reduce_scatter_to_sequence
        else:
            enter, exit = copy_to_tp, reduce_from_tp
        self.sequence_parallel = sequence_parallel
        self.attn_norm = copy.deepcopy(block.attn_norm)
        self.mlp_norm = copy.deepcopy(block.mlp_norm)
        self.attn = ParallelAttention(block.attn, group, enter, exit)
        self.mlp = ParallelMLP(block.mlp, group, enter, exit)
        if sequence_parallel:  # these see only a sequence shard: their grads are partial sums
            for p in [*self.attn_norm.parameters(), *self.mlp_norm.parameters(), self.mlp.down.bias]:
                p.sequence_parallel = True

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


# --- vocabulary parallel -----------------------------------------------------------------

def vocab_range(vocab_size: int, group=None) -> tuple[int, int]:
    rank, size = tp_rank_size(group)
    if vocab_size % size:
        raise ValueError(f"vocab_size={vocab_size} is not divisible by {size} ranks")
    per = vocab_size // size
    return rank * per, (rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [lo, hi) of the table; tokens outside look up zeros; g sums the ranks."""

    def __init__(self, embed: nn.Embedding, group=None, exit=None):
        super().__init__()
        self.group, self.exit = group, exit or reduce_from_tp
        self.lo, self.hi = vocab_range(embed.num_embeddings, group)
        self.weight = nn.Parameter(embed.weight.detach()[self.lo:self.hi].clone())
        self.weight.tp_dim = 0

    def forward(self, tokens):
        outside = (tokens < self.lo) | (tokens >= self.hi)
        local = (tokens - self.lo).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return self.exit(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log Σ_v exp(z_v) − z_target with z split over ranks by vocabulary.

    Three all-reduces of per-token scalars (max, target logit, sum of exp) instead of gathering
    the (tokens × V) logits. Backward needs no communication: softmax − one-hot, locally.
    Rows whose target is ignore_index get loss 0 and gradient 0, as in F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, logits, target, lo, hi, group, vocab, ignore_index):
        z = logits.float()
        ignored = target == ignore_index
        bad = ~ignored & ((target < 0) | (target >= vocab))
        # The bad-target flag rides on the max all-reduce: every rank learns that some rank got a
        # bad target and raises, instead of the others waiting in the next all-reduce.
        zmax = torch.cat([z.max(dim=-1).values.reshape(-1), bad.any().to(z.dtype).reshape(1)])
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        record("all_reduce", "forward")
        if zmax[-1] > 0:
            values = sorted(set(target[bad].tolist()))
            where = (f"target values {values[:5]}" if values else "a target on another rank of the group")
            raise ValueError(f"vocab_parallel_cross_entropy: {where} outside [0, {vocab}) "
                             f"(vocab size {vocab}; ignore_index={ignore_index} marks rows to skip)")
        zmax = zmax[:-1].view(target.shape)
        z = z - zmax[..., None]  # stable exp
        inside = (target >= lo) & (target < hi)
        local_t = (target - lo).masked_fill(~inside, 0)
        z_t = z.gather(-1, local_t[..., None]).squeeze(-1).masked_fill(~inside, 0.0)
        dist.all_reduce(z_t, group=group)
        record("all_reduce", "forward")
        exp = z.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        record("all_reduce", "forward")
        softmax = exp / sum_exp[..., None]
        ctx.save_for_backward(softmax, local_t, inside, ignored)
        ctx.dtype = logits.dtype
        return (sum_exp.log() - z_t).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside, ignored = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t[..., None], -inside[..., None].to(g.dtype))
        grad = grad.masked_fill(ignored, 0.0)
        return (g * grad[..., None]).to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, target, group=None, reduction="mean", ignore_index=-100):
    """Cross-entropy over vocab-sharded logits (..., V/t); equal to F.cross_entropy on the full ones,
    ignore_index included: "mean" divides by the rows not ignored (nan when all are, like torch).
    A target outside [0, V) other than ignore_index raises ValueError on every rank."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits_shard.shape)} without the vocabulary dimension")
    vocab = logits_shard.shape[-1] * dist.get_world_size(group)
    lo, hi = vocab_range(vocab, group)
    loss = _VocabParallelCrossEntropy.apply(logits_shard, target, lo, hi, group, vocab, ignore_index)
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    if reduction == "sum":
        return loss.sum()
    return loss


class TensorParallelLM(nn.Module):
    """TinyTransformer with every piece split over a group: vocab-parallel embedding, parallel
    blocks, replicated final norm and a column-parallel head whose logits stay sharded."""

    def __init__(self, model, group=None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        exit = None
        if sequence_parallel:  # the embedding's sum lands sharded along the sequence
            from dpo_lab.parallel.sequence import reduce_scatter_to_sequence as exit
        self.embed = VocabParallelEmbedding(model.embed, group, exit)
        self.blocks = nn.ModuleList(ParallelBlock(b, group, sequence_parallel) for b in model.blocks)
        self.norm = copy.deepcopy(model.norm)
        if sequence_parallel:
            for p in self.norm.parameters():
                p.sequence_parallel = True
        # With SP the all-gather before the head plays f's role (its backward reduce-scatters).
        self.head = ColumnParallelLinear(model.head, group, copy_input=not sequence_parallel)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.sequence_parallel:
            from dpo_lab.parallel.sequence import gather_from_sequence
            x = gather_from_sequence(x, self.group)
        return self.head(x)  # logits (b, s, V/t), sharded by vocabulary

    def loss(self, tokens, targets):
        logits = self(tokens)
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.group)


def sharded_like(reference: nn.Module, parallel: nn.Module, group=None, grad: bool = False) -> dict:
    """{name: (reference tensor cut to this rank's shard, parallel tensor)} for every parallel
    parameter (their .grad with grad=True): how a split model is compared with its unsplit twin."""
    ref = dict(reference.named_parameters())
    pairs = {}
    for name, p in parallel.named_parameters():
        r = ref[re.sub(r"(^|\.)local\.", r"\1", name)]  # ParallelAttention keeps heads in .local
        r, p = (r.grad, p.grad) if grad else (r.detach(), p.detach())
        dim = getattr(parallel.get_parameter(name), "tp_dim", None)
        if dim is not None:
            r = r.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)]
        pairs[name] = (r, p)
    return pairs


def max_grad_error(reference: nn.Module, parallel: nn.Module, group=None) -> float:
    return max((r - p).abs().max().item()
               for r, p in sharded_like(reference, parallel, group, grad=True).values())
