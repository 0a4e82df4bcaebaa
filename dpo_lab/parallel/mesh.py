"""Process groups for combining parallelisms: a dp × tp grid of ranks.

Rank = d·tp + t. Ranks in a row (same d) form a tensor-parallel group: they hold different shards
of the same replica and talk every layer, so they are neighbours (same node in real clusters).
Ranks in a column (same t) form a data-parallel group: they hold the same shard of different
replicas and all-reduce gradients once per step.

    dp=2, tp=2:   tp groups [0, 1], [2, 3]      dp groups [0, 2], [1, 3]

Every rank must create every group, in the same order (new_group is collective).
"""
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class Mesh:
    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    dp_group: object
    tp_group: object
    dp_ranks: list
    tp_ranks: list


def grid(dp: int, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tp groups, dp groups) as lists of global ranks."""
    tp_groups = [[d * tp + t for t in range(tp)] for d in range(dp)]
    dp_groups = [[d * tp + t for d in range(dp)] for t in range(tp)]
    return tp_groups, dp_groups


def make_mesh(dp: int, tp: int) -> Mesh:
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp * tp != world:
        raise ValueError(f"dp × tp = {dp} × {tp} = {dp * tp} does not match world size {world}")
    tp_groups, dp_groups = grid(dp, tp)
    mine = {}
    for kind, groups in (("tp", tp_groups), ("dp", dp_groups)):
        for ranks in groups:
            g = dist.new_group(ranks)  # collective: every rank creates every group
            if rank in ranks:
                mine[kind] = (g, ranks)
    (tp_group, tp_ranks), (dp_group, dp_ranks) = mine["tp"], mine["dp"]
    return Mesh(dp, tp, rank // tp, rank % tp, dp_group, tp_group, dp_ranks, tp_ranks)


def mesh_train_rank(dp: int = 2, tp: int = 2, steps: int = 4, seed: int = 0, lr: float = 1e-2,
                    vocab: int = 64, dim: int = 32, n_layers: int = 2, n_heads: int = 4,
                    n_kv_heads: int = 2, batch: int = 4, seq: int = 8,
                    sequence_parallel: bool = True) -> dict:
    """Rank function: train a TinyTransformer for a few AdamW steps on a dp × tp mesh (tensor +
    sequence parallel inside a replica, data parallel across replicas) and, on the side, in a
    single process. Returns both loss curves and the largest parameter difference at the end."""
    from dpo_lab.arch.transformer import TinyTransformer
    from dpo_lab.parallel.sequence import sync_sequence_parallel_grads
    from dpo_lab.parallel.tensor import TensorParallelLM, sharded_like

    mesh = make_mesh(dp, tp)
    if batch % dp:
        raise ValueError(f"batch={batch} is not divisible by dp={dp}")
    torch.manual_seed(seed)
    ref = TinyTransformer(vocab, dim, n_layers, n_heads, n_kv_heads)
    batch_data = (torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq)))
    data = [batch_data] * steps  # one batch, fitted step after step: the loss must fall
    par = TensorParallelLM(copy.deepcopy(ref), mesh.tp_group, sequence_parallel)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr)
    par_opt = torch.optim.AdamW(par.parameters(), lr=lr)
    per = batch // dp
    ref_losses, par_losses = [], []
    for tokens, targets in data:
        loss = F.cross_entropy(ref(tokens).flatten(0, 1), targets.flatten())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.item())

        mine = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)  # this replica's share
        loss = par.loss(tokens[mine], targets[mine])
        par_opt.zero_grad()
        loss.backward()
        if sequence_parallel:
            sync_sequence_parallel_grads(par, mesh.tp_group)
        for p in par.parameters():  # data parallel: average gradients over replicas
            dist.all_reduce(p.grad, group=mesh.dp_group)
            p.grad /= dp
        par_opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=mesh.dp_group)
        par_losses.append(global_loss.item() / dp)
    param_err = max((r - p).abs().max().item() for r, p in sharded_like(ref, par, mesh.tp_group).values())
    return {"rank": dist.get_rank(), "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank,
            "tp_ranks": mesh.tp_ranks, "dp_ranks": mesh.dp_ranks, "ref_losses": ref_losses,
            "par_losses": par_losses, "param_err": param_err}



def mesh_groups_rank(dp: int, tp: int) -> dict:
    """Rank function: the groups make_mesh gives this rank (checked with an all-reduce in each),
    next to the groups torch's own DeviceMesh builds for the same (dp, tp) grid."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = make_mesh(dp, tp)
    x = torch.tensor([float(dist.get_rank())])
    in_tp, in_dp = x.clone(), x.clone()
    dist.all_reduce(in_tp, group=mesh.tp_group)
    dist.all_reduce(in_dp, group=mesh.dp_group)
    torch_mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    return {"dp": mesh.dp_ranks, "tp": mesh.tp_ranks, "tp_sum": in_tp.item(), "dp_sum": in_dp.item(),
            "torch_dp": dist.get_process_group_ranks(torch_mesh.get_group("dp")),
            "torch_tp": dist.get_process_group_ranks(torch_mesh.get_group("tp"))}
