"""Collectives written by hand from point-to-point sends, and the numbers used to judge them.

    naive_all_reduce(t)   # every rank sends to rank 0, rank 0 sums and sends the result back
    ring_all_reduce(t)    # reduce-scatter then all-gather around a ring (Baidu / NCCL / Horovod)
    recursive_doubling_all_reduce(t)  # log2 p exchanges of the whole tensor with rank XOR 2^k

All three work in place on `t`, for any world size and any number of elements (the ring splits the
tensor with `tensor_split`, so chunks may differ by one element), and return the bytes this rank
sent, so callers can check the communication volume against theory:

    naive: rank 0 sends (n-1)·S, every other rank sends S      (rank 0 is the bottleneck)
    ring:  every rank sends 2·(n-1)/n · S                        (bandwidth-optimal)
    recursive doubling, n = 2^k: every rank sends log2(n) · S        (latency-optimal: log2 n steps)

Bandwidths follow the nccl-tests definitions: algbw = S / t and busbw = algbw · factor, where the
factor makes busbw comparable with the link speed whatever the world size.
"""
import torch
import torch.distributed as dist

# nccl-tests "bus bandwidth" correction factors, n = world size.
BUSBW_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> int:
    """Send to dst while receiving from src (both at once, so a ring never deadlocks)."""
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send.contiguous(), dst))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, src))
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    return _nbytes(send)


def naive_all_reduce(t: torch.Tensor) -> int:
    """Sum `t` over all ranks, in place: gather everything to rank 0, then send the sum back."""
    rank, n = dist.get_rank(), dist.get_world_size()
    sent = 0
    if n == 1:
        return sent
    if rank == 0:
        buf = torch.empty_like(t)
        for src in range(1, n):
            dist.recv(buf, src)
            t += buf
        for dst in range(1, n):
            dist.send(t, dst)
            sent += _nbytes(t)
    else:
        dist.send(t, 0)
        sent += _nbytes(t)
        dist.recv(t, 0)
    return sent


def ring_reduce_scatter_(chunks: list[torch.Tensor]) -> int:
    """n-1 steps: pass a running partial sum to the right neighbour and add what comes from the left.

    Afterwards chunk (rank+1) % n on this rank holds the sum over all ranks."""
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    # One receive buffer for all steps: a fresh one per step costs an allocation and, for MiB
    # chunks, first-touch page faults that gloo's own ring does not pay (lesson 04, "closing the gap").
    scratch = chunks[0].new_empty(max(c.numel() for c in chunks))
    sent = 0
    for step in range(n - 1):
        send_idx, recv_idx = (rank - step) % n, (rank - step - 1) % n
        buf = scratch[:chunks[recv_idx].numel()]
        sent += _exchange(chunks[send_idx], right, buf, left)
        chunks[recv_idx] += buf
    return sent


def ring_all_gather_(chunks: list[torch.Tensor]) -> int:
    """n-1 steps: forward the chunk just completed to the right; rank r starts owning chunk r+1."""
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    sent = 0
    for step in range(n - 1):
        send_idx, recv_idx = (rank + 1 - step) % n, (rank - step) % n
        sent += _exchange(chunks[send_idx], right, chunks[recv_idx], left)
    return sent


def ring_all_reduce(t: torch.Tensor) -> int:
    """Sum `t` over all ranks, in place, with the ring algorithm; returns bytes this rank sent."""
    n = dist.get_world_size()
    if n == 1:
        return 0
    if not t.is_contiguous():
        raise ValueError("ring_all_reduce needs a contiguous tensor (it works on views of it)")
    chunks = list(t.view(-1).tensor_split(n))  # views: writing a chunk writes t
    return ring_reduce_scatter_(chunks) + ring_all_gather_(chunks)


def recursive_doubling_all_reduce(t: torch.Tensor) -> int:
    """Sum `t` over all ranks, in place, by recursive doubling; returns bytes this rank sent.

    Step k exchanges the whole buffer with rank XOR 2^k and adds: after log2(p) steps every rank
    holds the sum (Thakur, Rabenseifner and Gropp 2005, §4). Fewer steps than the ring's 2(p-1),
    each carrying all S bytes instead of S/p: it wins when α dominates, i.e. for small messages.
    A world size n that is not a power of two is folded onto p = 2^floor(log2 n) ranks first (MPICH):
    each of the first 2(n-p) ranks that is even hands its tensor to the odd rank above it, sits out,
    and gets the result back at the end (2 extra steps for those ranks)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if n == 1:
        return 0
    if not t.is_contiguous():
        raise ValueError("recursive_doubling_all_reduce needs a contiguous tensor")
    p = 1 << (n.bit_length() - 1)       # largest power of two <= n
    extra = n - p                        # ranks 0..2·extra-1 pair up, the even one sits out
    buf, sent = torch.empty_like(t), 0
    if rank < 2 * extra and rank % 2 == 0:
        dist.send(t, rank + 1)
        dist.recv(t, rank + 1)           # the result, once the others are done
        return _nbytes(t)
    if rank < 2 * extra:
        dist.recv(buf, rank - 1)
        t.add_(buf)
    vrank = rank // 2 if rank < 2 * extra else rank - extra   # rank among the p that take part
    real = lambda v: 2 * v + 1 if v < extra else v + extra     # ... and back
    mask = 1
    while mask < p:
        sent += _exchange(t, real(vrank ^ mask), buf, real(vrank ^ mask))
        t.add_(buf)
        mask <<= 1
    if rank < 2 * extra:
        dist.send(t, rank - 1)
        sent += _nbytes(t)
    return sent


def bandwidths(op: str, size_bytes: float, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s, as nccl-tests defines them."""
    if op not in BUSBW_FACTORS:
        raise ValueError(f"unknown collective {op!r}; have {sorted(BUSBW_FACTORS)}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    algbw = size_bytes / seconds
    return algbw, algbw * BUSBW_FACTORS[op](world_size)


def show_collective(ax_before, ax_after, name: str, before: list, after: list) -> None:
    """Draw every rank's tensor (one row per rank) before and after a collective, values written in."""
    for ax, rows, when in ((ax_before, before, "before"), (ax_after, after, "after")):
        width = max(1, max(len(r) for r in rows))
        grid = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            if len(r):
                grid[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
        im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
        for i, r in enumerate(rows):
            for j, v in enumerate(r):  # dark text on the light (yellow) end of viridis, white elsewhere
                light = im.norm(v) > 0.6
                ax.text(j, i, f"{v:g}", ha="center", va="center", color="black" if light else "white", fontsize=8)
        ax.set_yticks(range(len(rows)), [f"rank {i}" for i in range(len(rows))])
        ax.set_xticks([])
        blank = " (blank: not defined there)" if when == "after" and any(not len(r) for r in rows) else ""
        ax.set_title(f"{name}: {when}{blank}", fontsize=9)


def recursive_doubling_time(size_bytes: float, n: int, alpha: float, beta: float) -> float:
    """α-β time of recursive doubling: log2(p) steps of α + S/β, p = 2^floor(log2 n), plus the
    fold-in and hand-back steps when n is not a power of two. Compare cost.ring_all_reduce_time:
    2(n-1)·α + 2(n-1)/n·S/β. At n = 4 the two cross at S = 8αβ."""
    if n == 1:
        return 0.0
    p = 1 << (n.bit_length() - 1)
    steps = p.bit_length() - 1 + (2 if n != p else 0)
    return steps * (alpha + size_bytes / beta)
