"""Mixture of experts and expert parallelism (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

A router scores each token against E experts and keeps its top-k. Every expert has a fixed
buffer of C = ceil(capacity_factor · T · k / E) slots per group of T tokens; tokens are placed
first-choice-first in token order, and those that find their expert full are dropped (their MoE
output is zero; the residual connection carries them). The load-balancing loss
E · Σ_e f_e · P_e (f_e: share of routed assignments to e, P_e: mean router probability of e)
is smallest when the load is uniform.

Expert parallelism spreads the experts over n ranks: each rank routes its own tokens, an
all-to-all sends every expert's slots to the rank that owns it, the experts run, and a second
all-to-all brings the outputs home. Backward runs the two all-to-alls in reverse. Each rank sends
the slots of the other ranks' experts, (n-1)/n of its (E, C, d) buffer, per all-to-all; the bytes
are counted from the split sizes each call used (`count_all_to_all_bytes`).
"""
import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from dpo_lab.arch.transformer import MLP
from dpo_lab.parallel.tensor import count_collectives, counted, record


@dataclass
class Routing:
    expert: torch.Tensor   # (T, k) chosen experts
    slot: torch.Tensor     # (T, k) position in the expert's buffer
    keep: torch.Tensor     # (T, k) False where the expert was full: dropped
    gate: torch.Tensor     # (T, k) combine weights
    probs: torch.Tensor    # (T, E) router probabilities
    capacity: int


def capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def route(logits: torch.Tensor, k: int, capacity_factor: float) -> Routing:
    n_tokens, n_experts = logits.shape
    if not 1 <= k <= n_experts:
        raise ValueError(f"top-k must be in [1, {n_experts}], got {k}")
    probs = logits.float().softmax(-1)
    top, expert = probs.topk(k, dim=-1)
    gate = top / top.sum(-1, keepdim=True) if k > 1 else top  # Switch keeps p for k = 1
    cap = capacity(n_tokens, n_experts, k, capacity_factor)
    slot = torch.empty_like(expert)
    filled = torch.zeros(n_experts, dtype=torch.long)
    for j in range(k):  # all first choices before any second choice (GShard)
        onehot = nn.functional.one_hot(expert[:, j], n_experts)
        pos = onehot.cumsum(0) - 1 + filled  # how many tokens were placed in this expert before
        slot[:, j] = (pos * onehot).sum(-1)
        filled += onehot.sum(0)
    return Routing(expert, slot, slot < cap, gate, probs, cap)


def load_balancing_loss(r: Routing) -> torch.Tensor:
    n_experts = r.probs.shape[-1]
    f = torch.bincount(r.expert.flatten(), minlength=n_experts).float() / r.expert.numel()
    return n_experts * (f * r.probs.mean(0)).sum()


def expert_load(r: Routing) -> torch.Tensor:
    """Assignments each expert received before the capacity cut."""
    return torch.bincount(r.expert.flatten(), minlength=r.probs.shape[-1])


def train_moe(moe: "MoE", batches, aux_weight: float = 0.0, lr: float = 1e-2,
              capacity_factor: float = 1.0) -> dict:
    """Adam on MSE(moe(x), y) + aux_weight · E·Σ_e f_e P_e (Switch uses aux_weight = 0.01), one step
    per (x, y) in batches; trains moe in place. Per step: the task loss, the balancing loss, each
    expert's share of the assignments, and the share of assignments capacity_factor would drop."""
    if aux_weight < 0:
        raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
    opt = torch.optim.Adam(moe.parameters(), lr=lr)
    hist = {"task_loss": [], "aux_loss": [], "load_share": [], "dropped": []}
    for x, y in batches:
        out, aux, r = moe(x)
        task = (out - y).pow(2).mean()
        opt.zero_grad()
        (task + aux_weight * aux).backward()
        opt.step()
        with torch.no_grad():  # the routing this step used, cut at the capacity we ask about
            dropped = ~route(r.probs.log(), moe.k, capacity_factor).keep
        hist["task_loss"].append(task.item())
        hist["aux_loss"].append(aux.item())
        hist["load_share"].append((expert_load(r).float() / r.expert.numel()).tolist())
        hist["dropped"].append(dropped.float().mean().item())
    return hist


def dispatch(tokens: torch.Tensor, r: Routing, n_experts: int) -> torch.Tensor:
    """(E, C, dim) buffers; empty slots are zeros."""
    t_idx = torch.arange(tokens.shape[0])[:, None].expand_as(r.expert)
    flat = (r.expert * r.capacity + r.slot)[r.keep]
    buf = tokens.new_zeros(n_experts * r.capacity, tokens.shape[-1])
    buf = buf.index_copy(0, flat, tokens[t_idx[r.keep]])
    return buf.view(n_experts, r.capacity, -1)


def combine(expert_out: torch.Tensor, r: Routing, n_tokens: int) -> torch.Tensor:
    """y_t = Σ_j gate_tj · expert_out[e_tj, slot_tj] over the kept choices of token t."""
    t_idx = torch.arange(n_tokens)[:, None].expand_as(r.expert)[r.keep]
    flat = (r.expert * r.capacity + r.slot)[r.keep]
    rows = expert_out.reshape(-1, expert_out.shape[-1])[flat] * r.gate[r.keep][:, None].to(expert_out.dtype)
    return expert_out.new_zeros(n_tokens, expert_out.shape[-1]).index_add(0, t_idx, rows)


class MoE(nn.Module):
    """Single-process MoE layer: router + E expert MLPs. forward(x) -> (y, aux_loss, routing)."""

    def __init__(self, dim: int, hidden: int, n_experts: int, k: int = 1, capacity_factor: float = 1.25):
        super().__init__()
        self.n_experts, self.k, self.capacity_factor = n_experts, k, capacity_factor
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(dim, hidden) for _ in range(n_experts))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        r = route(self.router(tokens), self.k, self.capacity_factor)
        buf = dispatch(tokens, r, self.n_experts)
        out = torch.stack([expert(buf[e]) for e, expert in enumerate(self.experts)])
        return combine(out, r, tokens.shape[0]).view_as(x), load_balancing_loss(r), r


A2A_BYTES = Counter()  # (direction, "sent" | "received") -> bytes exchanged with other ranks


def count_all_to_all_bytes():
    """with count_all_to_all_bytes() as b: ... ; b[("forward", "sent")] is what this rank sent inside."""
    return counted(A2A_BYTES)


def _exchange(x, group, direction):
    n, me = dist.get_world_size(group), dist.get_rank(group)
    send = recv = [x.shape[0] // n] * n  # equal splits: every rank holds the same (E, C, d) buffer
    out = x.new_empty(x.shape)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                           group=group)
    record("all_to_all", direction)
    row = x[0].numel() * x.element_size()
    # chunk `me` stays on this rank: only the other chunks cross the link
    A2A_BYTES[(direction, "sent")] += row * sum(rows for j, rows in enumerate(send) if j != me)
    A2A_BYTES[(direction, "received")] += row * sum(rows for j, rows in enumerate(recv) if j != me)
    return out


class _AllToAll(torch.autograd.Function):
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i. Its own inverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, "backward"), None


def all_to_all(x, group=None):
    return _AllToAll.apply(x, group)


class ExpertParallelMoE(nn.Module):
    """The same MoE with experts [r·E/n, (r+1)·E/n) on rank r; the router is replicated."""

    def __init__(self, moe: MoE, group=None):
        super().__init__()
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        if moe.n_experts % n:
            raise ValueError(f"n_experts={moe.n_experts} is not divisible by {n} ranks")
        self.group, self.n = group, n
        self.n_experts, self.k, self.capacity_factor = moe.n_experts, moe.k, moe.capacity_factor
        self.local = moe.n_experts // n
        self.router = copy.deepcopy(moe.router)
        self.experts = nn.ModuleList(copy.deepcopy(moe.experts[rank * self.local + e])
                                     for e in range(self.local))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        self._check_token_counts(tokens)
        r = route(self.router(tokens), self.k, self.capacity_factor)
        buf = dispatch(tokens, r, self.n_experts)            # (E, C, d), experts in rank order
        recv = all_to_all(buf, self.group)                   # (n·E_local, C, d): my experts' slots from every rank
        recv = recv.view(self.n, self.local, r.capacity, -1)
        out = torch.stack([expert(recv[:, e].reshape(-1, recv.shape[-1])).view(self.n, r.capacity, -1)
                           for e, expert in enumerate(self.experts)], dim=1)
        back = all_to_all(out.reshape(self.n_experts, r.capacity, -1), self.group)  # (E, C, d) home again
        return combine(back, r, tokens.shape[0]).view_as(x), load_balancing_loss(r), r

    def _check_token_counts(self, tokens) -> None:
        """The capacity, hence the all-to-all buffers, follow the token count: unequal counts
        would mismatch the all-to-all. Agreed over the group so that every rank raises."""
        mine = torch.tensor([tokens.shape[0], tokens.shape[1]], device=tokens.device)
        counts = [torch.empty_like(mine) for _ in range(self.n)]
        dist.all_gather(counts, mine, group=self.group)
        counts = [tuple(c.tolist()) for c in counts]
        for rank, (n_tok, width) in enumerate(counts):
            if width != counts[0][1]:
                raise ValueError(f"rank {rank} has tokens of width {width}, rank 0 has {counts[0][1]}: "
                                 f"expert parallel needs one model dimension on every rank")
            if n_tok != counts[0][0]:
                raise ValueError(f"rank {rank} has {n_tok} tokens, rank 0 has {counts[0][0]}: expert "
                                 f"parallel needs equal token counts per rank (pad or drop)")


def ep_check_rank(seed: int = 0, dim: int = 16, hidden: int = 32, n_experts: int = 4, k: int = 2,
                  capacity_factor: float = 1.0, tokens_per_rank: int = 32, aux_weight: float = 0.01,
                  volume_factors: tuple = ()) -> dict:
    """Rank function: rank r routes group r of the tokens; compare outputs, dropped tokens and
    gradients with the single-process MoE applied to every group. Also returns the all-to-all bytes
    this rank sent and received, for that step and for one step at each of volume_factors."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, n_experts, k, capacity_factor)
    x = torch.randn(n, tokens_per_rank, dim, requires_grad=True)

    ref_loss, ref_out, ref_keep = 0.0, None, None
    for g in range(n):  # the reference: one process, every group
        y, aux, r = moe(x[g])
        ref_loss = ref_loss + (y * y).sum() + aux_weight * aux
        if g == rank:
            ref_out, ref_keep = y.detach(), r.keep
    ref_loss.backward()

    ep = ExpertParallelMoE(moe)
    x_local = x[rank].detach().clone().requires_grad_()
    with count_collectives() as fwd, count_all_to_all_bytes() as fwd_bytes:
        y, aux, r = ep(x_local)
    loss = (y * y).sum() + aux_weight * aux
    with count_collectives() as bwd, count_all_to_all_bytes() as bwd_bytes:
        loss.backward()
    volume = []
    for cf in volume_factors:  # the buffers, hence the bytes, follow the capacity C
        probe = copy.deepcopy(ep)
        probe.capacity_factor = cf
        with count_all_to_all_bytes() as b:
            # an input with a gradient, as in a real stack: else backward skips dispatch's all-to-all
            yv, auxv, rv = probe(x_local.detach().requires_grad_())
            ((yv * yv).sum() + aux_weight * auxv).backward()
        volume.append({"capacity_factor": cf, "capacity": rv.capacity, "bytes": _plain(b)})
    for p in ep.router.parameters():  # the router is data-parallel: sum its gradient
        dist.all_reduce(p.grad)
    grad_err = max((a.grad - b.grad).abs().max().item() for a, b in
                   [(moe.router.weight, ep.router.weight)] +
                   [(pa, pb) for e in range(ep.local) for pa, pb in
                    zip(moe.experts[rank * ep.local + e].parameters(), ep.experts[e].parameters())])
    return {"out_err": (y.detach() - ref_out).abs().max().item(),
            "input_grad_err": (x_local.grad - x.grad[rank]).abs().max().item(),
            "same_dropped": bool(torch.equal(r.keep, ref_keep)),
            "dropped": int((~r.keep).sum()), "assignments": r.keep.numel(),
            "grad_err": grad_err, "collectives_forward": dict(fwd), "collectives_backward": dict(bwd),
            "load": expert_load(r).tolist(), "capacity": r.capacity,
            "a2a_bytes": _plain(fwd_bytes + bwd_bytes), "volume": volume}


def _plain(c: Counter) -> dict:
    """{"forward sent": bytes, ...}: picklable, JSON-friendly."""
    return {f"{d} {what}": int(v) for (d, what), v in sorted(c.items())}
