"""Data parallelism written by hand: every rank holds the whole model and averages gradients.

    model = DataParallel(net, bucket_size_mb=1)   # broadcasts rank 0's weights and buffers
    loss(model(x_local)).backward()               # all-reduces start while backward still runs
    model.finish_gradient_synchronization()       # wait for them
    optimizer.step()

    with model.no_sync():                         # gradient accumulation: no communication ...
        loss(model(x_1)).backward()
    loss(model(x_2)).backward()                   # ... until the last micro-batch
    model.finish_gradient_synchronization()

A gradient is ready once autograd has accumulated it into `.grad` (a post-accumulate-grad hook
fires then, once per parameter even when the parameter is used twice, as tied embeddings are).
Without buckets each ready gradient is all-reduced on its own; with `bucket_size_mb` the
parameters are grouped, in reverse order (roughly the order backward produces them), into buckets
of about that size, and a bucket is flattened and all-reduced once all its gradients are ready:
fewer, larger messages pay the latency α fewer times. Communication overlaps the rest of backward.

Buckets are launched strictly in bucket order, as torch's DDP does: gloo and nccl pair the k-th
collective of one rank with the k-th of the others, so a rank that used a parameter the others did
not (a branch taken on its data only) must not launch that bucket earlier than they do. A bucket
waits for the ones before it; `finish_gradient_synchronization()` launches the rest, a parameter
without a gradient on this rank taking part with zeros.

`overlap=False` is the baseline that overlap is measured against: the hooks only count, and every
bucket is launched by `finish_gradient_synchronization()`, after backward. `recorder`, when set, is
called as recorder(kind, bucket) at each bucket's "ready", "launch" and "done" (completion callback
of the async work); `dpo_lab.parallel.timeline` records and plots them.
"""
from contextlib import contextmanager

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


def second_gradient_error(name: str, fix: str) -> RuntimeError:
    return RuntimeError(
        f"parameter {name!r} received another gradient after its all-reduce was launched and before "
        f"finish_gradient_synchronization(): the new gradient is added into a tensor still being "
        f"reduced, so the ranks would end up with different gradients. {fix}")


class DataParallel(nn.Module):
    """find_unused_parameters=False: a parameter that no rank used this step gets a zero gradient
    (AdamW still decays it). True: one more, small, all-reduce of a per-parameter used-mask, and
    such a parameter keeps `.grad` None, exactly as DDP(find_unused_parameters=True) leaves it."""

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None,
                 find_unused_parameters: bool = False, overlap: bool = True):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (start ranks with launch)")
        if bucket_size_mb is not None and bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0 or None, got {bucket_size_mb}")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be True or False, got {overlap!r}")
        self.module = module
        self.world_size = dist.get_world_size()
        self.find_unused_parameters = find_unused_parameters
        self.overlap = overlap
        self.recorder = None  # recorder(kind, bucket): see the module docstring
        with torch.no_grad():  # every rank starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)
        self.params = unique_trainable(module.parameters())
        names = {}
        for n, p in module.named_parameters():  # first name of a tied parameter
            names.setdefault(id(p), n)
        self.index = {id(p): k for k, p in enumerate(self.params)}
        self.names = [names[id(p)] for p in self.params]
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
        self.require_sync = True
        self._reset()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _reset(self):
        self.ready = [0] * len(self.buckets)  # distinct parameters of each bucket that are ready
        self.next_bucket = 0  # buckets [0, next_bucket) are launched
        self.used = [False] * len(self.params)  # got a gradient since the last synchronisation
        self.counted = [False] * len(self.params)  # ... outside no_sync, counted in self.ready
        self.zero_filled = []  # parameters given a zero gradient to take part
        self.pending = []  # (bucket index, work handle, flat buffer or None)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Backward inside accumulates into .grad without communicating (torch DDP's no_sync);
        the first backward outside it launches the all-reduces of the accumulated sums."""
        before, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = before

    def _grad_ready(self, p: torch.Tensor) -> None:
        k, i = self.index[id(p)], self.bucket_of[id(p)]
        if i < self.next_bucket:  # its all-reduce is in flight (or done): too late to add to it
            raise second_gradient_error(self.names[k], "For gradient accumulation run every backward "
                                        "but the last inside `with model.no_sync():`.")
        self.used[k] = True
        if not self.require_sync or self.counted[k]:  # accumulated twice before launch: count once
            return
        self.counted[k] = True
        if self.recorder is not None and self.ready[i] + 1 == len(self.buckets[i]):
            self.recorder("ready", i)  # this gradient completes bucket i
        if not self.overlap:  # the baseline: finish_gradient_synchronization launches every bucket
            self.ready[i] += 1
            return
        self.ready[i] += 1
        while self.next_bucket < len(self.buckets) and \
                self.ready[self.next_bucket] == len(self.buckets[self.next_bucket]):
            self._launch(self.next_bucket)

    def _launch(self, i: int) -> None:
        assert i == self.next_bucket, (i, self.next_bucket)  # one order on every rank
        self.next_bucket += 1
        bucket = self.buckets[i]
        for p in bucket:  # a parameter unused on this rank still takes part, with a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                self.zero_filled.append(p)
        # Divide first and sum: the average, with any backend (gloo has no AVG on some versions).
        if len(bucket) == 1:
            flat = None
            grad = bucket[0].grad
            grad.div_(self.world_size)
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket]).div_(self.world_size)
            grad = flat
        self.bytes_sent += 2 * (self.world_size - 1) * grad.numel() * grad.element_size() // self.world_size
        if self.recorder is not None:
            self.recorder("launch", i)
        work = dist.all_reduce(grad, async_op=True)
        if self.recorder is not None:  # runs on the communication thread when the all-reduce completes
            self.recorder.track(work.get_future().then(lambda _, i=i, rec=self.recorder: rec("done", i)))
        self.pending.append((i, work, flat))

    def finish_gradient_synchronization(self) -> None:
        """Launch the buckets not launched yet, in order, and wait for every all-reduce."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
        used = None
        if self.find_unused_parameters:  # after every bucket, so it is the last collective everywhere
            used = torch.tensor(self.used, dtype=torch.float32,
                                device=self.params[0].device if self.params else None)
            self.bytes_sent += 2 * (self.world_size - 1) * used.numel() * used.element_size() // self.world_size
            self.pending.append((None, dist.all_reduce(used, async_op=True), None))
        error = None
        for i, work, flat in self.pending:  # wait for every handle, even after one failed
            try:
                work.wait()
            except Exception as e:
                error = error or e
                continue
            if flat is not None:
                offset = 0
                for p in self.buckets[i]:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
        if used is not None and error is None:
            for p in self.zero_filled:
                if used[self.index[id(p)]] == 0:  # no rank used it: as DDP, no gradient at all
                    p.grad = None
        self._reset()
        if error is not None:
            raise error
