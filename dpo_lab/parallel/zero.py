"""ZeRO stages 1 and 2: shard the optimizer state (and the gradients) across data-parallel ranks.

    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)            # ZeRO-1
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-3)   # ZeRO-2

Every parameter is cut into n equal pieces (the last one shorter when n does not divide it);
rank r owns piece r of every parameter and keeps optimizer state only for its pieces. The pieces
are views of the parameter, so stepping them updates the model in place; one all-gather then
hands every rank the pieces it does not own. This is exact for element-wise optimizers (SGD, Adam,
AdamW): each element's update depends only on that element's gradient and state.

Stage 1 expects gradients that are already averaged (wrap the model in DataParallel). Stage 2
does the averaging itself: as each gradient becomes ready it is reduce-scattered, so each rank
receives only the average of its own pieces, and the full gradient is freed. As in DataParallel,
the reduce-scatters are launched in one fixed order (reverse parameter order) on every rank; a
parameter without a gradient on this rank takes part with zeros when the step synchronises.
Gradient accumulation: call `finish_gradient_synchronization()` after each backward (the reduced
pieces add up); a second backward before it raises.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from dpo_lab.parallel.data_parallel import second_gradient_error, unique_trainable

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning per call)
# in favour of the *_single names, which older torch (the floor is 2.6) lacks: same collectives,
# same arguments; the new name wherever it exists.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(lo, hi, k): rank's piece [lo, hi) of a flattened tensor cut into pieces of k elements."""
    k = math.ceil(numel / world_size)
    lo = min(rank * k, numel)
    return lo, min(lo + k, numel), k


def padded(flat: torch.Tensor, total: int) -> torch.Tensor:
    """`flat` followed by zeros up to `total` elements (collectives need equal pieces)."""
    if flat.numel() == total:
        return flat
    return torch.cat([flat, flat.new_zeros(total - flat.numel())])


class ShardedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_cls, stage: int = 1, **kwargs):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is FullyShardedDataParallel), got {stage}")
        if not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs torch.distributed initialised (start ranks with launch)")
        params = list(params)
        if params and isinstance(params[0], dict):
            raise ValueError("ShardedOptimizer takes one parameter group (a list of parameters)")
        params = unique_trainable(params)
        super().__init__(params, kwargs)
        self.stage, self.rank, self.world_size = stage, dist.get_rank(), dist.get_world_size()
        self.ranges, self.shards = [], []
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous")
            lo, hi, k = shard_range(p.numel(), self.rank, self.world_size)
            self.ranges.append((lo, hi, k))
            self.shards.append(nn.Parameter(p.detach().view(-1)[lo:hi]))  # a view: no copy
        self.inner = optimizer_cls(self.shards, **kwargs)
        self.bytes_sent = 0  # ring volume of this optimizer's collectives, per rank
        self.pending = []
        self.order = list(reversed(range(len(params))))  # launch order, roughly backward's
        self.position = {i: j for j, i in enumerate(self.order)}
        self._reset_round()
        if stage == 2:
            for i, p in enumerate(params):
                p.register_post_accumulate_grad_hook(lambda p, i=i: self._grad_ready(i, p))

    def _reset_round(self):
        self.ready = [False] * len(self.order)
        self.launched = 0  # self.order[:launched] are reduce-scattered this round

    def _grad_ready(self, i: int, p: torch.Tensor) -> None:
        if self.position[i] < self.launched:  # its gradient is already gone; this one is new
            raise second_gradient_error(
                f"#{i} (shape {tuple(p.shape)})", "With ZeRO-2, call finish_gradient_synchronization() "
                "after each backward to accumulate gradients.")
        self.ready[i] = True
        while self.launched < len(self.order) and self.ready[self.order[self.launched]]:
            self._launch_next()

    def _launch_next(self) -> None:
        i = self.order[self.launched]
        self.launched += 1
        p = self.param_groups[0]["params"][i]
        if p.grad is None:  # unused on this rank: it still takes part, with zeros
            p.grad = torch.zeros_like(p)
        self._reduce_scatter(i, p)

    def _reduce_scatter(self, i: int, p: torch.Tensor) -> None:
        lo, hi, k = self.ranges[i]
        full = padded(p.grad.reshape(-1), k * self.world_size).div_(self.world_size)
        out = torch.empty(k, dtype=full.dtype, device=full.device)
        self.bytes_sent += (self.world_size - 1) * k * full.element_size()
        self.pending.append((i, reduce_scatter_single(out, full, async_op=True), out, full))
        p.grad = None  # the full gradient is not kept: only our piece of it

    def finish_gradient_synchronization(self) -> None:
        """Stage 2: launch the reduce-scatters not launched yet (in order), wait for all of them
        and hand each piece's gradient to the inner optimizer."""
        if self.stage == 2:
            while self.launched < len(self.order):
                self._launch_next()
        pending, self.pending = self.pending, []
        self._reset_round()
        error = None
        for i, work, out, _ in pending:  # wait for every handle, even after one failed
            try:
                work.wait()
            except Exception as e:
                error = error or e
                continue
            lo, hi, _ = self.ranges[i]
            g = out[:hi - lo]
            shard = self.shards[i]
            shard.grad = g if shard.grad is None else shard.grad + g
        if error is not None:
            raise error

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if self.stage == 1:
            for p, shard, (lo, hi, _) in zip(self.param_groups[0]["params"], self.shards, self.ranges):
                shard.grad = None if p.grad is None else p.grad.view(-1)[lo:hi]
        elif self.pending or any(self.ready):  # a backward since the last synchronisation
            # (a rank that may get no gradient at all must call finish_gradient_synchronization)
            self.finish_gradient_synchronization()
        for key, value in self.param_groups[0].items():  # lr schedulers edit our param_groups
            if key != "params":
                self.inner.param_groups[0][key] = value
        self.inner.step()
        self._all_gather()
        return loss

    def _all_gather(self) -> None:
        """One all-gather of every rank's updated pieces, each padded to its k elements."""
        params = self.param_groups[0]["params"]
        if self.world_size == 1 or not params:
            return
        send = torch.cat([padded(s.detach().reshape(-1), k) for s, (_, _, k) in zip(self.shards, self.ranges)])
        recv = torch.empty(self.world_size * send.numel(), dtype=send.dtype, device=send.device)
        all_gather_single(recv, send)
        self.bytes_sent += (self.world_size - 1) * send.numel() * send.element_size()
        pieces = recv.view(self.world_size, -1)
        offset = 0
        for p, (_, _, k) in zip(params, self.ranges):
            p.view(-1).copy_(pieces[:, offset:offset + k].reshape(-1)[:p.numel()])
            offset += k

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        self.inner.zero_grad(set_to_none)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def rank_memory(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank actually holds: parameters, gradients and optimizer state."""
    inner = getattr(optimizer, "inner", optimizer)
    params = list(module.parameters())
    grads = [p.grad for p in params] + [p.grad for g in inner.param_groups for p in g["params"]]
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": storage_bytes(params), "grads": storage_bytes(grads),
            "optimizer": storage_bytes(state)}
