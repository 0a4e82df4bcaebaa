"""Data parallelism written by hand: every rank holds the whole model and averages gradients.

    model = DataParallel(net, bucket_size_mb=1)   # broadcasts rank 0's weights and buffers
    loss(model(x_local)).backward()               # all-reduces start while backward still runs
    model.finish_gradient_synchronization()       # wait for them
    optimizer.step()

A gradient is ready once autograd has accumulated it into `.grad` (a post-accumulate-grad hook
fires then, once per parameter even when the parameter is used twice, as tied embeddings are).
Without buckets each ready gradient is all-reduced on its own; with `bucket_size_mb` the
parameters are grouped, in reverse order (roughly the order backward produces them), into buckets
of about that size, and a bucket is flattened and all-reduced once all its gradients are ready:
fewer, larger messages pay the latency α fewer times. Communication overlaps the rest of backward.
"""
import torch
import torch.distributed as dist
import torch.nn as nn


def unique_trainable(params) -> list[nn.Parameter]:
    """Parameters that need a gradient, each once (tied parameters appear once)."""
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class DataParallel(nn.Module):
    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (start ranks with launch)")
        if bucket_size_mb is not None and bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0 or None, got {bucket_size_mb}")
        self.module = module
        self.world_size = dist.get_world_size()
        with torch.no_grad():  # every rank starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)
        self.params = unique_trainable(module.parameters())
        self.bytes_sent = 0  # ring volume of the all-reduces launched: 2(n−1)/n per byte
        if bucket_size_mb is None:
            self.buckets = [[p] for p in reversed(self.params)]
        else:
            self.buckets, limit, size = [[]], bucket_size_mb * 2**20, 0
            for p in reversed(self.params):
                if self.buckets[-1] and size + p.numel() * p.element_size() > limit:
                    self.buckets.append([])
                    size = 0
                self.buckets[-1].append(p)
                size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._reset()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _reset(self):
        self.ready = [0] * len(self.buckets)
        self.pending = {}  # bucket index -> (work handle, flat buffer or None)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _grad_ready(self, p: torch.Tensor) -> None:
        i = self.bucket_of[id(p)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        for p in bucket:  # a parameter unused this step still takes part, with a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Divide first and sum: the average, with any backend (gloo has no AVG on some versions).
        if len(bucket) == 1:
            flat = None
            grad = bucket[0].grad
            grad.div_(self.world_size)
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket]).div_(self.world_size)
            grad = flat
        self.bytes_sent += 2 * (self.world_size - 1) * grad.numel() * grad.element_size() // self.world_size
        self.pending[i] = (dist.all_reduce(grad, async_op=True), flat)

    def finish_gradient_synchronization(self) -> None:
        """Wait for every all-reduce (launching those of buckets with unused parameters first)."""
        for i in range(len(self.buckets)):
            if i not in self.pending:
                self._launch(i)
        for i, (work, flat) in self.pending.items():
            work.wait()
            if flat is not None:
                offset = 0
                for p in self.buckets[i]:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
        self._reset()
