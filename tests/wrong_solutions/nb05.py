import torch
import torch.distributed as dist

from tests.wrong_solutions import wrong


def _bucketed_hooks(params, bucket_size, divide=True, in_order=True, partial=True, reset=True):
    """The exercise's solution with one of the usual mistakes switched on."""
    world = dist.get_world_size()
    buckets = [params[i:i + bucket_size] for i in range(0, len(params), bucket_size)]
    bucket_of = {id(p): b for b, bucket in enumerate(buckets) for p in bucket}
    ready = [0] * len(buckets)
    state = {"next": 0}

    def flush(bucket):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        if divide:
            flat /= world
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def full(b):
        return ready[b] == (len(buckets[b]) if partial else bucket_size)

    def hook(p):
        b = bucket_of[id(p)]
        ready[b] += 1
        if not in_order:  # flush as soon as this bucket is full, whatever the others do
            if full(b):
                flush(buckets[b])
                state["next"] += 1
        else:
            while state["next"] < len(buckets) and full(state["next"]):
                flush(buckets[state["next"]])
                state["next"] += 1
        if reset and state["next"] == len(buckets):
            ready[:] = [0] * len(buckets)
            state["next"] = 0

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


@wrong("05.1", "world_size × too large (2×)")
def hooks_sum_not_mean(params, bucket_size):
    _bucketed_hooks(params, bucket_size, divide=False)


@wrong("05.1", "flushed in a rank-dependent order")
def hooks_flush_when_full(params, bucket_size):
    _bucketed_hooks(params, bucket_size, in_order=False)


@wrong("05.1", "last, partial bucket (parameters [4]")
def hooks_partial_bucket_never_full(params, bucket_size):
    _bucketed_hooks(params, bucket_size, partial=False)


@wrong("05.1", "reset the per-bucket ready counts")
def hooks_never_reset(params, bucket_size):
    _bucketed_hooks(params, bucket_size, reset=False)


@wrong("05.1", "leave the averaged gradient in p.grad")
def hooks_replace_grad_by_none(params, bucket_size):
    def hook(p):  # "frees" the gradient it has just sent, as a ZeRO-2 hook would
        dist.all_reduce(p.grad)
        p.grad = None
    for p in params:
        p.register_post_accumulate_grad_hook(hook)


@wrong("05.1", "never all-reduced")
def hooks_on_grad_not_accumulated(params, bucket_size):
    # A tensor hook (register_hook) sees the incoming gradient, and what it returns replaces it:
    # reducing a clone and returning nothing leaves .grad local.
    for p in params:
        p.register_hook(lambda g: dist.all_reduce(g.clone()))


@wrong("05.1", "called on some ranks only")
def hooks_reduce_on_rank_0_only(params, bucket_size):
    def hook(p):
        if dist.get_rank() == 0:  # "rank 0 collects the gradients"
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    for p in params:
        p.register_post_accumulate_grad_hook(hook)

# --- 05.2 -----------------------------------------------------------------------------------------

@wrong("05.2", "the last rank misses the remainder")
def shard_floor(numel, rank, world_size):
    k = numel // world_size
    return rank * k, (rank + 1) * k


@wrong("05.2", "uneven split")
def shard_floor_remainder_to_last(numel, rank, world_size):
    k = numel // world_size
    return rank * k, numel if rank == world_size - 1 else (rank + 1) * k


@wrong("05.2", "overlapping shards")
def shard_inclusive_end(numel, rank, world_size):
    k = -(-numel // world_size)
    return min(rank * k, numel), min((rank + 1) * k + 1, numel)  # hi taken as inclusive, +1 once more


@wrong("05.2", "clamp lo and hi to numel")
def shard_unclamped(numel, rank, world_size):
    k = -(-numel // world_size)
    return rank * k, min((rank + 1) * k, numel)


@wrong("05.2", "uneven split")
def shard_array_split(numel, rank, world_size):
    # numpy.array_split's rule: the first numel % world_size pieces get one more element
    k, extra = divmod(numel, world_size)
    lo = rank * k + min(rank, extra)
    return lo, lo + k + (rank < extra)


@wrong("05.2", "rank r owns piece r")
def shard_reversed(numel, rank, world_size):
    k = -(-numel // world_size)
    r = world_size - 1 - rank
    return min(r * k, numel), min((r + 1) * k, numel)
