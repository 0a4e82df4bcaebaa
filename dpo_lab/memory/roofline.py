"""The roofline model (Williams, Waterman & Patterson, CACM 2009): an operation that does F FLOPs
and must move B bytes between memory and the cores cannot run faster than
min(peak FLOP/s, bandwidth × F/B). F/B is its arithmetic intensity; peak/bandwidth is the ridge.

Bytes here are *compulsory* traffic: every operand read once and every result written once (an
ideal cache); a real kernel may move more, never less, so the attained fraction is an upper bound
of how well the kernel uses the machine.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OpCost:
    name: str
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOP per byte of compulsory traffic."""
        return self.flops / self.bytes


def _check_positive(**sizes):
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive int")


def matmul_cost(m: int, k: int, n: int, elem_bytes: int = 4, name="matmul") -> OpCost:
    """(m×k) @ (k×n): m·n dot products of length k, a multiply and an add each; read A and B, write C."""
    _check_positive(m=m, k=k, n=n, elem_bytes=elem_bytes)
    return OpCost(name, 2 * m * k * n, elem_bytes * (m * k + k * n + m * n))


def elementwise_cost(numel: int, n_inputs: int = 2, flops_per_elem: int = 1, elem_bytes: int = 4,
                     name="elementwise") -> OpCost:
    """out = f(x1..xn) elementwise (e.g. a + b: 1 FLOP, 2 reads and 1 write per element)."""
    _check_positive(numel=numel, n_inputs=n_inputs, flops_per_elem=flops_per_elem, elem_bytes=elem_bytes)
    return OpCost(name, flops_per_elem * numel, elem_bytes * (n_inputs + 1) * numel)


def softmax_cost(rows: int, cols: int, elem_bytes: int = 4) -> OpCost:
    """Per element: subtract the row max, exp, add to the row sum, divide; plus the max's compare:
    5 FLOPs (counting exp as one). Read x, write y."""
    _check_positive(rows=rows, cols=cols, elem_bytes=elem_bytes)
    return OpCost("softmax", 5 * rows * cols, 2 * elem_bytes * rows * cols)


def rmsnorm_cost(tokens: int, dim: int, elem_bytes: int = 4) -> OpCost:
    """y = x / sqrt(mean(x²) + ε) · g. Per element: square, add (the mean's sum), scale, gain: 4
    FLOPs. Read x and g, write y."""
    _check_positive(tokens=tokens, dim=dim, elem_bytes=elem_bytes)
    return OpCost("rmsnorm", 4 * tokens * dim, elem_bytes * (2 * tokens * dim + dim))


def attention_cost(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                   elem_bytes: int = 4, name="attention") -> OpCost:
    """softmax(QKᵀ/√d)V without a mask, as a fused kernel that never writes the scores: QKᵀ and PV
    are 2·q·kv·d FLOPs each per head (the softmax's 5 per score is added); read Q, K, V, write O."""
    _check_positive(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    bh = batch * heads
    flops = bh * (4 * q_len * kv_len * head_dim + 5 * q_len * kv_len)
    return OpCost(name, flops, elem_bytes * bh * (2 * q_len * head_dim + 2 * kv_len * head_dim))


def block_cost(block: torch.nn.Module, batch: int, seq: int, elem_bytes: int = 4, name="block") -> OpCost:
    """A transformer block (dpo_lab.arch.transformer.Block) on `batch` sequences of `seq` tokens:
    2 FLOPs per weight per token in the linear layers plus attention's scores; bytes: every
    parameter read once plus the block's input and output. Norms, RoPE, GELU and the residual adds
    (about 20 FLOPs per token per channel) are left out: < 1 % of the linear layers' at dim ≥ 256."""
    _check_positive(batch=batch, seq=seq)
    lin = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    att = block.attn
    dim = att.q_proj.in_features
    flops = 2 * batch * seq * lin + batch * att.n_heads * 4 * seq * seq * att.head_dim
    params = sum(p.numel() for p in block.parameters())
    return OpCost(name, flops, elem_bytes * (params + 2 * batch * seq * dim))


def time_op(fn, repeats: int = 5, min_time: float = 0.05) -> float:
    """Best seconds per call of fn() (best of `repeats` runs of enough calls to last `min_time`):
    on a shared machine the fastest run is the one least disturbed by the neighbours."""
    fn()  # warm-up: allocations, one-time kernel selection
    calls, t0 = 1, time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    calls = max(1, int(min_time / max(once, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_matmul_flops(sizes=(512, 1024, 2048), dtype=torch.float32, device="cpu", repeats: int = 5) -> float:
    """The best FLOP/s of n×n×n matmuls, large enough to be compute-bound (intensity n/6 FLOP/byte
    in fp32); the best over sizes, since the fastest size depends on the machine's blocking."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n ** 3 / time_op(lambda: torch.mm(a, b, out=out), repeats))
    return best


def triad_bandwidth(numel: int = 1 << 24, dtype=torch.float32, device="cpu", repeats: int = 5) -> float:
    """Bytes/s of STREAM's triad a = b + s·c (McCalpin, 1995): 2 reads and 1 write per element, far
    larger than the caches (3 × 64 MiB in fp32 at the default size)."""
    b, c = (torch.rand(numel, device=device).to(dtype) for _ in range(2))
    a = torch.empty_like(b)
    nbytes = 3 * numel * b.element_size()
    return nbytes / time_op(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)


def attainable(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roof: min(peak, bandwidth × intensity) FLOP/s."""
    return min(peak_flops, bandwidth * intensity)


def attained_fraction(flops_per_s: float, intensity: float, peak_flops: float, bandwidth: float) -> float:
    return flops_per_s / attainable(intensity, peak_flops, bandwidth)


def ops_zoo(dim: int = 1024, device="cpu", dtype=torch.float32, seed: int = 0):
    """The operations of the roofline plot, each as (OpCost, fn): matmuls of growing size, a
    matrix–vector product (one decoded token through a 2dim×8dim weight), elementwise add and GELU,
    softmax, RMSNorm, attention at prefill and at decode, and a transformer block at batch 1 and 64
    (one token per sequence: decoding). The memory-bound operands are 64 MiB or more in fp32, twice
    a 32 MiB L3 cache, so they stream from memory rather than from the cache."""
    from dpo_lab.arch.transformer import Block

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    eb = torch.tensor([], dtype=dtype).element_size()
    ops = []
    for n in (32, 128, 512, 1024):
        a, b, o = rnd(n, n), rnd(n, n), torch.empty(n, n, device=device, dtype=dtype)
        ops.append((matmul_cost(n, n, n, eb, name=f"matmul {n}³"), lambda a=a, b=b, o=o: torch.mm(a, b, out=o)))
    w, x = rnd(2 * dim, 8 * dim), rnd(1, 2 * dim)
    ops.append((matmul_cost(1, 2 * dim, 8 * dim, eb, name="matvec (decode)"), lambda: x @ w))
    n = 1 << 24
    u, v = rnd(n), rnd(n)
    uv = torch.empty_like(u)  # written in place: a fresh 64 MiB output would add page faults
    ops.append((elementwise_cost(n, 2, 1, eb, name="add"), lambda: torch.add(u, v, out=uv)))
    # GELU (tanh form): about 8 FLOPs per element
    ops.append((elementwise_cost(n, 1, 8, eb, name="gelu"), lambda: F.gelu(u, approximate="tanh")))
    s = rnd(4096, 4096)
    ops.append((softmax_cost(4096, 4096, eb), lambda: torch.softmax(s, dim=-1)))
    xs, gain = rnd(16 * dim, dim), torch.ones(dim, device=device, dtype=dtype)
    ops.append((rmsnorm_cost(16 * dim, dim, eb), lambda: F.rms_norm(xs, (dim,), gain)))
    h, hd = 8, 64
    q, k, vv = rnd(1, h, 1024, hd), rnd(1, h, 1024, hd), rnd(1, h, 1024, hd)
    ops.append((attention_cost(1, h, 1024, 1024, hd, eb, name="attention prefill"),
                lambda: F.scaled_dot_product_attention(q, k, vv)))
    q1, k1, v1 = rnd(16, h, 1, hd), rnd(16, h, 2048, hd), rnd(16, h, 2048, hd)
    ops.append((attention_cost(16, h, 1, 2048, hd, eb, name="attention decode"),
                lambda: F.scaled_dot_product_attention(q1, k1, v1)))
    torch.manual_seed(seed)
    block = Block(dim, 8).to(device=device, dtype=dtype).eval()
    for batch in (1, 64):
        xb = rnd(batch, 1, dim)
        ops.append((block_cost(block, batch, 1, eb, name=f"block, batch {batch}"),
                    lambda xb=xb: block(xb)))
    return ops


def measure_ops(ops, repeats: int = 5) -> list[dict]:
    """Each op's measured time, FLOP/s and intensity, under no_grad (inference kernels)."""
    rows = []
    with torch.no_grad():
        for cost, fn in ops:
            t = time_op(fn, repeats)
            rows.append(dict(name=cost.name, flops=cost.flops, bytes=cost.bytes,
                             intensity=cost.intensity, seconds=t, flops_per_s=cost.flops / t))
    return rows
