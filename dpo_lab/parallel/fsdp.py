"""ZeRO stage 3 written by hand: parameters, gradients and optimizer state all sharded.

    model = FullyShardedDataParallel(net, compute_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # sees only this rank's fp32 shards
    loss(model(x_local)).backward(); model.finish_gradient_synchronization(); opt.step()

The model is cut into units: each module inside an nn.ModuleList (a transformer block) is one,
and the root holds what is left (embedding, final norm, head, and any tied parameters). A unit's
parameters are flattened into one buffer, padded to a multiple of n, and rank r keeps slice r as
an fp32 master shard. Around the unit's forward:

    pre-forward   all-gather the shards (in compute_dtype) and point the module's weights at them
    post-forward  drop the gathered weights; autograd's saved copies are replaced by markers
    backward      the first op that needs a saved weight all-gathers the unit again;
                  once the unit's gradient is complete it is reduce-scattered (async) and freed

so at most one or two units are ever whole. Per step each rank sends Ψ (forward all-gather) +
Ψ (backward all-gather) + Ψ (reduce-scatter), times (n−1)/n: 3Ψ against plain DP's 2Ψ.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from dpo_lab.parallel.zero import all_gather_single, reduce_scatter_single


class _Unit:
    """The parameters of one module (not those of nested units), flattened and sharded."""

    def __init__(self, fsdp, module, slots, compute_dtype):
        self.fsdp, self.module, self.compute_dtype = fsdp, module, compute_dtype
        n, r = fsdp.world_size, fsdp.rank
        self.params = slots  # [(name, param, [(submodule, attr), ...]), ...]
        self.numels = [p.numel() for _, p, _ in slots]
        total = sum(self.numels)
        self.k = math.ceil(total / n)
        flat = torch.cat([p.detach().reshape(-1).float() for _, p, _ in slots]) if slots else torch.zeros(0)
        flat = torch.cat([flat, flat.new_zeros(n * self.k - total)])
        self.shard = nn.Parameter(flat[r * self.k:(r + 1) * self.k].clone())  # fp32 master
        for _, _, places in slots:
            for mod, attr in places:
                del mod._parameters[attr]
                setattr(mod, attr, None)
        self.full_fwd = self.full_bwd = None
        self.contexts = []

    # ---- communication
    def all_gather(self) -> torch.Tensor:
        n = self.fsdp.world_size
        send = self.shard.detach().to(self.compute_dtype or self.shard.dtype)
        out = torch.empty(n * self.k, dtype=send.dtype, device=send.device)
        all_gather_single(out, send)
        self.fsdp.bytes_sent += (n - 1) * self.k * send.element_size()
        return out

    def reduce_scatter(self, grad_full: torch.Tensor) -> None:
        n = self.fsdp.world_size
        grad = torch.cat([grad_full.reshape(-1), grad_full.new_zeros(n * self.k - grad_full.numel())])
        grad = grad.div_(n).contiguous()
        out = torch.empty(self.k, dtype=grad.dtype, device=grad.device)
        self.fsdp.bytes_sent += (n - 1) * self.k * grad.element_size()
        work = reduce_scatter_single(out, grad, async_op=True)
        self.fsdp.pending.append((self, work, out, grad))

    # ---- forward hooks
    def point_at(self, full) -> None:
        offset = 0
        for (_, p, places), numel in zip(self.params, self.numels):
            view = None if full is None else full[offset:offset + numel].view(p.shape)
            for mod, attr in places:
                setattr(mod, attr, view)
            offset += numel

    def pre_forward(self, module, args):
        full = _Gather.apply(self.shard, self)[: sum(self.numels)]
        self.full_fwd = full
        self.point_at(full)
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            ctx.__enter__()
            self.contexts.append(ctx)

    def post_forward(self, module, args, output):
        if self.contexts:
            self.contexts.pop().__exit__(None, None, None)
        self.point_at(None)
        self.full_fwd = None  # the only reference: the gathered weights are freed here
        return output

    # ---- saved-tensor hooks: save where a weight lives, not the weight
    def pack(self, t):
        f = self.full_fwd
        if f is not None and t.untyped_storage().data_ptr() == f.untyped_storage().data_ptr():
            return (_Unit, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        return t

    def unpack(self, packed):
        if isinstance(packed, tuple) and packed and packed[0] is _Unit:
            if self.full_bwd is None:
                with torch.no_grad():
                    self.full_bwd = self.all_gather()
            _, offset, shape, stride = packed
            return self.full_bwd.as_strided(shape, stride, offset)
        return packed


class _Gather(torch.autograd.Function):
    """Forward: all-gather a unit's shards. Backward: reduce-scatter its gradient (async)."""

    @staticmethod
    def forward(ctx, shard, unit):
        ctx.unit = unit
        return unit.all_gather()

    @staticmethod
    def backward(ctx, grad_full):
        ctx.unit.reduce_scatter(grad_full)
        ctx.unit.full_bwd = None  # the unit's backward is over: free the re-gathered weights
        return None, None  # the shard's gradient arrives in finish_gradient_synchronization


def _units_of(module: nn.Module) -> list[nn.Module]:
    """Modules inside any nn.ModuleList become units, the root last."""
    inner = [m for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return inner + [module]


def _check_fp32(module: nn.Module) -> None:
    """The fp32 master shards are cast from the module's weights and cast back into them, so a
    bf16 or fp64 module would silently train at another precision. Agreed over the ranks, so
    that every rank raises instead of the others waiting in the first broadcast."""
    bad = next((f"parameter {name!r} is {p.dtype}" for name, p in module.named_parameters()
                if p.requires_grad and p.dtype != torch.float32), None)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, bad)
    for rank, problem in enumerate(found):
        if problem is not None:
            raise ValueError(f"rank {rank}: {problem}: FullyShardedDataParallel keeps fp32 master "
                             f"weights and needs an fp32 module; for bf16 compute keep the module "
                             f"fp32 and pass compute_dtype=torch.bfloat16")


class FullyShardedDataParallel(nn.Module):
    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("FullyShardedDataParallel needs torch.distributed initialised (use launch)")
        if compute_dtype is not None and not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        _check_fp32(module)
        self.module, self.compute_dtype = module, compute_dtype
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.bytes_sent, self.pending = 0, []
        with torch.no_grad():  # every rank starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)
        units = _units_of(module)
        modname = {}
        for n, m in module.named_modules(remove_duplicate=False):
            modname.setdefault(id(m), n)
        owner, places, by_id = {}, {}, {}  # a parameter seen in two units goes to the root
        for ui, unit_mod in enumerate(units):
            for mod in unit_mod.modules():
                if any(mod is m for u in units[:ui] for m in u.modules()):
                    continue  # belongs to a nested unit
                for attr, p in list(mod._parameters.items()):
                    if p is None or not p.requires_grad:
                        continue
                    by_id[id(p)] = p
                    places.setdefault(id(p), []).append((mod, attr))
                    owner[id(p)] = ui if owner.get(id(p), ui) == ui else len(units) - 1
        self.full_names = {pid: f"{modname[id(pl[0][0])]}.{pl[0][1]}".lstrip(".") for pid, pl in places.items()}
        self.units = []
        for ui, unit_mod in enumerate(units):
            slots = [(self.full_names[pid], by_id[pid], places[pid]) for pid in owner if owner[pid] == ui]
            unit = _Unit(self, unit_mod, slots, compute_dtype)
            unit_mod.register_forward_pre_hook(unit.pre_forward)
            unit_mod.register_forward_hook(unit.post_forward)
            self.units.append(unit)
        self.shards = nn.ParameterList([u.shard for u in self.units])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self) -> None:
        """Wait for the reduce-scatters; each fp32 shard gets the average of its gradient."""
        for unit, work, out, _ in self.pending:
            work.wait()
            g = out.to(unit.shard.dtype)
            unit.shard.grad = g if unit.shard.grad is None else unit.shard.grad + g
        self.pending = []

    @torch.no_grad()
    def gather_full_params(self) -> dict:
        """{name: full fp32 tensor} of every sharded parameter (tied ones under their first name)."""
        out = {}
        for unit in self.units:
            n, k = self.world_size, unit.k
            full = torch.empty(n * k, dtype=unit.shard.dtype, device=unit.shard.device)
            all_gather_single(full, unit.shard.detach())
            offset = 0
            for (name, p, _), numel in zip(unit.params, unit.numels):
                out[name] = full[offset:offset + numel].view(p.shape).clone()
                offset += numel
        return out
