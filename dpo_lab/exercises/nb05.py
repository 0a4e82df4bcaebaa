"""Checks of notebook 05's exercises (data parallelism and ZeRO), graded on real ranks.

05.1, the gradient-ready hook with buckets: the reference is the single-process gradient of the
whole batch (the mean of every rank's local gradient, each rank computing all of them from seeded
data), so the check shares no code with `DataParallel`. 05.2, ZeRO's shard ownership: compared with
`dpo_lab.parallel.zero.shard_range`, which the lesson's ZeRO-1/2 use and the tests check.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from dpo_lab.exercises import Wrong, exercise, expect_close, scale_factor
from dpo_lab.parallel import launch
from dpo_lab.parallel.zero import shard_range

WORLD_SIZES = (2, 3)  # real ranks; 3 is odd, so halving and "rank 0 vs the rest" mistakes show
TIMEOUT = 60          # a deadlocked solution is reported, not waited on
BUCKET_SIZE, N_PARAMS = 2, 5  # buckets [0, 1], [2, 3], [4]: the last one is partial
# Per rank, the order in which gradients become ready in the last step: rank 0 fills bucket 0
# first, ranks 1 and 2 bucket 1 first (as when ranks take different branches of a model).
RANK_ORDERS = ([0, 1, 2, 3, 4], [2, 3, 0, 1, 4], [3, 2, 1, 0, 4])
STEPS = ("same order", "same order, second backward", "rank-dependent order")


def _targets(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(N_PARAMS)]


def bucket_rank(fn) -> list[dict]:
    """Rank function of 05.1: fn(params, bucket_size) registers the hooks, then three backwards.
    Parameter i's loss on rank r is ½‖p_i − t_{r,i}‖², run one parameter at a time so that the
    order in which gradients become ready is the check's to choose."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same parameters on every rank, as after DataParallel's broadcast
    params = [nn.Parameter(torch.randn(3, 4, dtype=torch.float64)) for _ in range(N_PARAMS)]
    fn(params, BUCKET_SIZE)
    try:
        return _bucket_steps(params, rank, world)
    except RuntimeError as e:
        if not any(k in str(e) for k in ("Connection closed by peer", "Timed out", "timed out")):
            raise
        # gloo's words for "no other rank joined": they finished, or wait elsewhere
        raise Wrong("stuck in a collective that the other ranks never joined: an all-reduce called on "
                    "some ranks only? Every rank must flush every bucket, in the same order") from None


def _bucket_steps(params, rank: int, world: int) -> list[dict]:
    out = []
    for step, kind in enumerate(STEPS):
        for p in params:
            p.grad = None
        t = _targets(step, rank)
        for i in (RANK_ORDERS[rank] if kind == "rank-dependent order" else range(N_PARAMS)):
            (0.5 * (params[i] - t[i]).pow(2).sum()).backward()
        with torch.no_grad():
            mean_t = [sum(_targets(step, r)[i] for r in range(world)) / world for i in range(N_PARAMS)]
            out.append({"got": [None if p.grad is None else p.grad.detach().clone() for p in params],
                        "local": [p.detach() - t[i] for i, p in enumerate(params)],
                        "want": [p.detach() - mean_t[i] for i, p in enumerate(params)]})
    return out


def _same(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def _diagnose_step(step: int, rank: int, world: int, res: dict) -> None:
    got, local, want = res["got"], res["local"], res["want"]
    where = f"with {world} ranks, rank {rank}"
    for i, g in enumerate(got):
        if g is None:
            raise Wrong(f"{where}: parameter {i} has no .grad after backward: leave the averaged "
                        "gradient in p.grad")
    if all(_same(g, w) for g, w in zip(got, want)):
        return
    if step == 2:
        raise Wrong(f"{where}: right when every rank's gradients become ready in the same order, wrong "
                    "when the order differs between ranks (rank 0 fills bucket 0 first, rank 1 bucket 1): "
                    "buckets were flushed in a rank-dependent order, so the k-th all-reduce summed different "
                    "buckets on different ranks. Flush strictly in bucket order 0, 1, 2, ..., each bucket "
                    "only after the ones before it")
    raw = [i for i, (g, l) in enumerate(zip(got, local)) if _same(g, l)]
    if step == 1 and raw:
        raise Wrong(f"{where}: the first backward was averaged, but on the second backward parameters "
                    f"{raw} were never all-reduced: reset the per-bucket ready counts (and the next bucket "
                    "to flush) once every bucket is flushed")
    factor = scale_factor(torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want]))
    if factor == world:
        raise Wrong(f"{where}: the gradients are world_size × too large ({world}×): divide the "
                    "all-reduced sum by world_size")
    last = list(range(N_PARAMS - N_PARAMS % BUCKET_SIZE, N_PARAMS))
    if raw == last:
        raise Wrong(f"{where}: the last, partial bucket (parameters {last}, fewer than bucket_size="
                    f"{BUCKET_SIZE}) was never flushed: a bucket is full when all of ITS parameters are "
                    "ready (len(bucket), not bucket_size)")
    if raw:
        raise Wrong(f"{where}: parameters {raw} were never all-reduced (their .grad is this rank's own "
                    "gradient): every bucket must be flushed once all its gradients are ready")
    expect_close(torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want]),
                 f"{where}, {STEPS[step]}: the averaged gradients", atol=1e-9, rtol=1e-9,
                 hints={1 / world: "did you divide by world_size twice?"})


@exercise("05.1", "the gradient-ready hook with buckets")
def check_bucketed_hooks(fn):
    """fn(params, bucket_size) registers post-accumulate-grad hooks that average the gradients
    over the ranks, bucket by bucket; graded at world sizes 2 and 3 against the single-process
    gradient of the whole batch."""
    for world in WORLD_SIZES:
        per_rank = launch(bucket_rank, world, args=(fn,), timeout=TIMEOUT)
        for step in range(len(STEPS)):  # the first wrong step tells most
            for rank, res in enumerate(per_rank):
                _diagnose_step(step, rank, world, res[step])


# --- 05.2 ZeRO shard ownership --------------------------------------------------------------------

NUMELS = (12, 13, 33, 7, 2, 1)  # divisible, remainders, fewer elements than ranks


def shard_rank(fn) -> dict:
    """Rank function of 05.2: each rank asks only for its own piece, as ZeRO's ranks do."""
    return {numel: fn(numel, dist.get_rank(), dist.get_world_size()) for numel in NUMELS}


def _as_range(x, numel, rank, world):
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise Wrong(f"shard_range({numel}, {rank}, {world}) returned {x!r}: return a pair (lo, hi)")
    lo, hi = (int(v) for v in x)
    return lo, hi


def diagnose_ranges(ranges: list, numel: int, world: int) -> None:
    """Raise Wrong unless `ranges` (rank r's (lo, hi)) is ZeRO's split of `numel` over `world` ranks."""
    ranges = [_as_range(x, numel, r, world) for r, x in enumerate(ranges)]
    case = f"numel={numel}, world_size={world}"
    for r, (lo, hi) in enumerate(ranges):
        if not 0 <= lo <= hi <= numel:
            raise Wrong(f"{case}: rank {r} owns [{lo}, {hi}), outside [0, {numel}]: clamp lo and hi to "
                        "numel (with fewer elements than ranks, the last ranks own nothing)")
    owner = [[] for _ in range(numel)]
    for r, (lo, hi) in enumerate(ranges):
        for e in range(lo, hi):
            owner[e].append(r)
    both = [e for e in range(numel) if len(owner[e]) > 1]
    if both:
        e = both[0]
        raise Wrong(f"{case}: overlapping shards: ranks {owner[e]} both own element {e} "
                    f"({len(both)} element(s) owned twice): rank r's piece starts where rank r-1's ends")
    nobody = [e for e in range(numel) if not owner[e]]
    if nobody:
        if nobody == list(range(nobody[0], numel)):
            raise Wrong(f"{case}: elements {nobody[0]}..{numel - 1} are owned by no rank: the last rank "
                        f"misses the remainder (numel is not a multiple of world_size); use pieces of "
                        f"k = ceil(numel / world_size) elements")
        raise Wrong(f"{case}: elements {nobody[:5]} are owned by no rank")
    want = [shard_range(numel, r, world)[:2] for r in range(world)]
    if ranges != want:
        k = -(-numel // world)
        sizes, want_sizes = [hi - lo for lo, hi in ranges], [hi - lo for lo, hi in want]
        if sizes != want_sizes:
            raise Wrong(f"{case}: uneven split, pieces of {sizes} elements, expected {want_sizes}: every "
                        f"piece but the last has k = ceil(numel / world_size) = {k} elements (the last is "
                        "shorter), so that the padded reduce-scatter's equal pieces line up with their owners")
        r = next(r for r in range(world) if ranges[r] != want[r])
        raise Wrong(f"{case}: rank {r} owns [{ranges[r][0]}, {ranges[r][1]}), expected "
                    f"[{want[r][0]}, {want[r][1]}): rank r owns piece r, in rank order")


@exercise("05.2", "ZeRO shard ownership")
def check_shard_range(fn):
    """fn(numel, rank, world_size) -> (lo, hi): on real ranks at world sizes 2 and 3 (each rank asks
    for its own piece), then for world sizes 1..8 and numel 1..40 in this process."""
    for world in WORLD_SIZES:
        per_rank = launch(shard_rank, world, args=(fn,), timeout=TIMEOUT)
        for numel in NUMELS:
            diagnose_ranges([res[numel] for res in per_rank], numel, world)
    for world in range(1, 9):
        for numel in range(1, 41):
            diagnose_ranges([fn(numel, r, world) for r in range(world)], numel, world)
