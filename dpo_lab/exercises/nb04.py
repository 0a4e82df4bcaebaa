"""Checks of notebook 04's exercises (collectives from sends and receives), on real ranks.

Each check launches world sizes 2 and 3 (3 is odd: index mistakes that cancel modulo 2 show there)
and runs the student's function on every rank. The first round uses *labelled* values: chunk c of
rank q holds BASE**(q·n + c), so any sum of chunks can be read back digit by digit and the check
can say which rank's chunk landed where. A second round uses random values and a length the world
size does not divide, against `dist.all_reduce` / `dist.all_gather` (torch's collectives).

The student's function runs on the ranks through `dpo_lab.exercises.on_ranks` (a deadlock is named
after STUCK_S seconds, not left to the launcher's timeout).
"""
import torch
import torch.distributed as dist

from dpo_lab.exercises import Wrong, exercise, expect_close, scale_factor
from dpo_lab.exercises.on_ranks import LAUNCH_S, WORLD_SIZES, any_rank, call_on_rank, run_check, verdict_of

BASE = 4           # labels BASE**(q·n + c) are exact in float32 for n ≤ 3 (4**9 < 2**24)


# --- labelled values --------------------------------------------------------------------------------

def label(q: int, c: int, n: int) -> float:
    return float(BASE ** (q * n + c))


def decode(chunk: torch.Tensor, n: int) -> dict | None:
    """{(rank, chunk): times} that a labelled chunk is the sum of; None if it is no such sum."""
    if chunk.numel() == 0 or not torch.all(chunk == chunk.flatten()[0]):
        return None
    v = chunk.flatten()[0].item()
    if v != int(v) or v < 0 or v >= BASE ** (n * n):
        return None
    v, out = int(v), {}
    for i in range(n * n):
        v, k = divmod(v, BASE)
        if k:
            out[divmod(i, n)] = k
    return out


# --- 04.1 ring reduce-scatter -------------------------------------------------------------------

SCHEDULE = ("at step s send chunk (rank − s) % n to the right and add what arrives from the left "
            "into chunk (rank − s − 1) % n")


def _diagnose_reduce_scatter(chunks, r, n) -> str | None:
    o = (r + 1) % n
    want = torch.full_like(chunks[o], sum(label(q, o, n) for q in range(n)))
    hints = {n: "every partial sum was added world_size times: add each arriving one once",
             round(1 / n, 6): "the sum was averaged: a reduce-scatter sums (DDP divides by world_size "
                              "itself, once, after the reduction)"}
    what = f"rank {r}'s chunk {o}"
    if chunks[o].shape == want.shape and scale_factor(chunks[o].double(), want.double()) is not None:
        return verdict_of(lambda: expect_close(chunks[o], want, what, hints=hints))
    held = [decode(c, n) for c in chunks]
    if any(h is None for h in held):
        return None if held[o] == {(q, o): 1 for q in range(n)} else verdict_of(
            lambda: expect_close(chunks[o], want, what))
    for j, h in enumerate(held):  # a correct ring never mixes chunk indices nor adds twice
        for (q, c), k in sorted(h.items()):
            if c != j:
                return (f"rank {r} added rank {q}'s chunk {c} into its chunk {j}: the chunk it receives "
                        f"is not the one its left neighbour sends (one step off, or the wrong "
                        f"direction): {SCHEDULE}")
            if k > 1:
                return (f"rank {r}'s chunk {j} holds rank {q}'s values {k} times: one step too many? "
                        f"Run world_size − 1 steps and add each arriving partial sum once")
    if held[o] == {(q, o): 1 for q in range(n)}:
        return None
    done = [j for j, h in enumerate(held) if h == {(q, j): 1 for q in range(n)}]
    if done:
        late = (o - done[0]) % n
        return (f"rank {r} completed chunk {done[0]} instead of chunk (rank + 1) % n = {o}: its chunk "
                f"indices run {'one step' if late == 1 else f'{late} steps'} late ({SCHEDULE})")
    have = {q for q, _ in held[o]}
    if r not in have:
        return (f"rank {r}'s own values are missing from its chunk {o}: it overwrote the chunk with "
                f"what arrived; add it instead (chunks[i] += received)")
    missing = sorted(set(range(n)) - have)
    return (f"rank {r}'s chunk {o} lacks the values of rank(s) {missing}: in world_size − 1 = {n - 1} "
            f"steps every chunk must pass every rank ({SCHEDULE})")


def reduce_scatter_rank(fn):
    r, n = dist.get_rank(), dist.get_world_size()
    chunks = [torch.full((2,), label(r, c, n)) for c in range(n)]
    call_on_rank(fn, chunks)
    verdict = _diagnose_reduce_scatter(chunks, r, n)
    if any_rank(verdict is not None):
        return verdict
    # Random values, a length n does not divide: chunks of unequal length.
    numel = 5 * n + 1
    x = torch.randn(numel, generator=torch.Generator().manual_seed(100 + r))
    total = x.clone()
    dist.all_reduce(total)
    chunks = list(x.clone().tensor_split(n))
    try:
        call_on_rank(fn, chunks)
    except RuntimeError as e:
        if "size" not in str(e):
            raise
        raise Wrong(f"with chunks of unequal length ({[len(c) for c in chunks]}), your function raised "
                    f"RuntimeError: {e}. Size each receive buffer like the chunk it receives "
                    f"(torch.empty_like(chunks[i]))") from e
    o = (r + 1) % n
    return verdict_of(lambda: expect_close(chunks[o], total.tensor_split(n)[o],
                                           f"rank {r}'s chunk {o} (random values, chunks of unequal length)"))


@exercise("04.1", "ring reduce-scatter", timeout=4 * LAUNCH_S)
def check_ring_reduce_scatter(fn):
    """fn(chunks) on every rank: in place, in world_size − 1 steps, chunks[(rank + 1) % n] becomes
    the sum over ranks of that chunk (as dist.all_reduce computes it)."""
    run_check(reduce_scatter_rank, fn)


# --- 04.2 ring all-gather -----------------------------------------------------------------------

def _complete(j: int) -> float:
    return 1000.0 * (j + 1)           # chunk j, finished by the reduce-scatter


def _stale(q: int, j: int) -> float:
    return 10.0 * (q + 1) + (j + 1)   # rank q's unfinished partial sum of chunk j (never a _complete)


def _diagnose_all_gather(chunks, r, n) -> str | None:
    stale = {_stale(q, j): (q, j) for q in range(n) for j in range(n)}
    found = {}  # kind of mistake -> message, the most telling kind reported first
    for j, c in enumerate(chunks):
        want = torch.full((2,), _complete(j))
        if c.shape != want.shape or not torch.all(c == c.flatten()[0]):
            found.setdefault("other", verdict_of(lambda: expect_close(c, want, f"rank {r}'s chunk {j}")))
            continue
        v = c.flatten()[0].item()
        if v == _complete(j):
            continue
        if v in stale and stale[v] != (r, j):
            found.setdefault("early", (
                f"rank {r}'s chunk {j} holds rank {stale[v][0]}'s unfinished partial sum: a rank "
                f"forwarded a chunk before it had received it. At step s forward the chunk you "
                f"completed or received last: send chunk (rank + 1 − s) % n, receive chunk (rank − s) % n"))
        elif v - _complete(j) in stale:
            found.setdefault("added", (
                f"rank {r}'s chunk {j} is the complete chunk plus its old partial sum: in the "
                f"all-gather chunks arrive finished, so receive into the chunk (copy), don't add"))
        elif v in [_complete(k) for k in range(n)]:
            found.setdefault("index", (
                f"rank {r}'s chunk {j} holds chunk {int(v // 1000) - 1}: the chunk it receives is not "
                f"the one its left neighbour sends (send chunk (rank + 1 − s) % n, receive chunk "
                f"(rank − s) % n at step s)"))
        elif v in stale:
            found.setdefault("missing", (
                f"rank {r}'s chunk {j} never arrived: it still holds its own unfinished partial sum. "
                f"In world_size − 1 = {n - 1} steps receive chunk (rank − s) % n from the left"))
        else:
            found.setdefault("other", verdict_of(lambda: expect_close(c, want, f"rank {r}'s chunk {j}")))
    for kind in ("early", "added", "index", "missing", "other"):
        if kind in found:
            return found[kind]
    return None


def all_gather_rank(fn):
    r, n = dist.get_rank(), dist.get_world_size()
    o = (r + 1) % n
    chunks = [torch.full((2,), _complete(j) if j == o else _stale(r, j)) for j in range(n)]
    call_on_rank(fn, chunks)
    verdict = _diagnose_all_gather(chunks, r, n)
    if any_rank(verdict is not None):
        return verdict
    # Random values, chunks of unequal length; the twin is dist.all_gather of the owned chunks
    # (padded to one length, as gloo gathers equal sizes).
    numel = 5 * n + 1
    sizes = [len(c) for c in torch.empty(numel).tensor_split(n)]
    mine = torch.randn(sizes[o], generator=torch.Generator().manual_seed(200 + r))
    padded = torch.zeros(max(sizes))
    padded[:sizes[o]] = mine
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    want = [gathered[(j - 1) % n][:sizes[j]] for j in range(n)]  # rank q owns chunk q + 1
    chunks = [mine.clone() if j == o else torch.full((sizes[j],), -1.0) for j in range(n)]
    call_on_rank(fn, chunks)
    return verdict_of(lambda: expect_close(torch.cat(list(chunks)), torch.cat(want),
                                           f"rank {r}'s chunks (random values, chunks of unequal length)"))


@exercise("04.2", "ring all-gather", timeout=4 * LAUNCH_S)
def check_ring_all_gather(fn):
    """fn(chunks) on every rank, which starts owning the finished chunk (rank + 1) % n: in place,
    in world_size − 1 steps, every rank gets every finished chunk (as dist.all_gather)."""
    run_check(all_gather_rank, fn)
