"""Causal self-attention with a configurable number of KV heads, RoPE and a KV cache.

n_kv_heads == n_heads is multi-head attention (MHA), 1 < n_kv_heads < n_heads is grouped-query
attention (GQA: each KV head serves n_heads // n_kv_heads query heads), n_kv_heads == 1 is
multi-query attention (MQA). Layout follows Llama/Qwen2 (q_proj, k_proj, v_proj, o_proj) so
weights copy across one to one.
"""
import math

import torch
import torch.nn as nn


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float = 10000.0):
    """cos/sin of shape (seq, head_dim) for rotary embeddings (Llama's "rotate half" layout)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} is odd: RoPE rotates pairs of dimensions and needs an "
                         f"even head dimension")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotate each pair (x_i, x_{i+d/2}) by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def scaled_dot_product(q, k, v, causal: bool = True, q_offset: int = 0):
    """softmax(q kᵀ / √d) v with a causal mask; q may be the last few positions (decoding)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def grouped_scaled_dot_product(q, k, v, causal: bool = True, q_offset: int = 0):
    """Attention where k, v have fewer heads than q (GQA/MQA), without copying k and v.

    q: (batch, heads, sq, d); k, v: (batch, kv_heads, sk, d). Query head h uses KV head
    h // (heads // kv_heads), as in Llama's repeat_kv. The query heads of a group are folded
    into the row axis, so each KV head is read once per group rather than repeated in memory:
    that is where GQA saves memory traffic when decoding.
    """
    b, h, sq, d = q.shape
    kvh = k.shape[1]
    if h % kvh:
        raise ValueError(f"{h} query heads cannot share {kvh} KV heads evenly")
    groups = h // kvh
    qg = q.reshape(b, kvh, groups * sq, d)
    scores = (qg @ k.transpose(-2, -1) / math.sqrt(d)).view(b, kvh, groups, sq, -1)
    if causal:
        sk = k.shape[-2]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, kvh, groups * sq, -1)
    return (probs @ v).view(b, h, sq, d)


class KVCache:
    """Keys and values of the positions seen so far, per layer: (batch, kv_heads, seq, head_dim)."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer: int, k, v):
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def seq_len(self, layer: int = 0) -> int:
        return self.k[layer].shape[2] if layer in self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None,
                 rope_theta: float = 10000.0, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads  # `or` would turn 0 into MHA
        if n_heads < 1 or n_kv_heads < 1:
            raise ValueError(f"n_heads={n_heads} and n_kv_heads={n_kv_heads} must be >= 1 "
                             f"(n_kv_heads=None means n_heads)")
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if (dim // n_heads) % 2:
            raise ValueError(f"head_dim = dim // n_heads = {dim}//{n_heads} = {dim // n_heads} is odd: "
                             f"RoPE rotates pairs of dimensions and needs an even head dimension")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.rope_theta, self.layer_idx = rope_theta, layer_idx
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        start = cache.seq_len(self.layer_idx) if cache is not None else 0
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_tables(self.head_dim, torch.arange(start, start + s, device=x.device),
                               self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # the cache stores n_kv_heads, not n_heads
        # Per-rank head counts (q.shape[1], k.shape[1]), so a tensor-parallel shard works too.
        out = grouped_scaled_dot_product(q, k, v, causal=True, q_offset=start)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
