"""Rank functions for tests/test_timeline.py (importable, so ranks load them by reference)."""
import torch
import torch.distributed as dist

from dpo_lab.parallel.data_parallel import DataParallel
from dpo_lab.parallel.dp_training import lm_loss, make_batches, make_model


def synced_grads(overlap: bool, bucket_mb=0.02, batch=8, seq=16, seed=0) -> dict:
    """Gradients after one synchronised backward on this rank's rows."""
    rank, n = dist.get_rank(), dist.get_world_size()
    model = DataParallel(make_model(seed), bucket_size_mb=bucket_mb, overlap=overlap)
    tokens = make_batches(1, batch, seq, 64, seed)[0, rank * batch // n:(rank + 1) * batch // n]
    lm_loss(model, tokens).backward()
    model.finish_gradient_synchronization()
    return {name: p.grad.clone() for name, p in zip(model.names, model.params)}


def profiled_step(overlap: bool, bucket_mb=0.02, batch=8, seq=16, seed=0) -> dict:
    """torch.profiler's own record of one step, independent of our recorder: the main thread's
    all-reduce calls (c10d::allreduce_) and autograd's backward ops, as (start, end) in µs."""
    from torch.profiler import ProfilerActivity, profile
    rank, n = dist.get_rank(), dist.get_world_size()
    model = DataParallel(make_model(seed), bucket_size_mb=bucket_mb, overlap=overlap)
    tokens = make_batches(1, batch, seq, 64, seed)[0, rank * batch // n:(rank + 1) * batch // n]
    loss = lm_loss(model, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
        model.finish_gradient_synchronization()
    spans = lambda pred: sorted((e.time_range.start, e.time_range.end) for e in prof.events() if pred(e.name))
    return {"buckets": len(model.buckets),
            "allreduce": spans(lambda s: s == "c10d::allreduce_"),
            "backward": spans(lambda s: s.startswith("autograd::engine::evaluate_function"))}
