import torch
import torch.nn.functional as F

from dpo_lab.arch.attention import apply_rope, rope_tables
from tests.wrong_solutions import wrong


def _rope(x, positions, theta, *, interleaved=False, sign=1.0, exp_d=None, ignore_theta=False):
    d = x.shape[-1]
    theta = 10000.0 if ignore_theta else theta
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / (exp_d or d))
    angles = sign * positions.float()[:, None] * inv_freq[None, :]
    if interleaved:
        cos, sin = angles.cos(), angles.sin()
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sin


@wrong("03.1", "interleaved layout")
def rope_interleaved(x, positions, theta):
    return _rope(x, positions, theta, interleaved=True)


@wrong("03.1", "wrong way")
def rope_rotate_half_swapped(x, positions, theta):
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    return x * cos + torch.cat([x[..., d // 2:], -x[..., :d // 2]], dim=-1) * sin


@wrong("03.1", "instead of `positions`")
def rope_ignores_positions(x, positions, theta):
    return _rope(x, torch.arange(x.shape[-2]), theta)


@wrong("03.1", "base θ is ignored")
def rope_fixed_base(x, positions, theta):
    return _rope(x, positions, theta, ignore_theta=True)


@wrong("03.1", "frequencies are off")
def rope_exponent_over_half(x, positions, theta):
    return _rope(x, positions, theta, exp_d=x.shape[-1] // 2)


@wrong("03.1", "unrotated")
def rope_forgets_sin_term(x, positions, theta):
    return x.clone()


def _attend(q, k, v, causal=True, scale=None):
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


@wrong("03.2", "h % kv instead of h // group")
def gqa_tiled_heads(q, k, v):
    group = q.shape[1] // k.shape[1]
    return _attend(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1))


@wrong("03.2", "no causal mask")
def gqa_no_mask(q, k, v):
    group = q.shape[1] // k.shape[1]
    return _attend(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), causal=False)


@wrong("03.2", "not scaled")
def gqa_no_scale(q, k, v):
    group = q.shape[1] // k.shape[1]
    return _attend(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale=1.0)


@wrong("03.2", "softmax runs over the query axis")
def gqa_softmax_over_queries(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q.shape[-2]
    scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(
        ~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-2) @ v


def _decode(attn, x, cache_k, cache_v, *, pos=None, rotate=True, append=True, causal=False,
            repeat_cache=False):
    b, hd, t = x.shape[0], attn.head_dim, cache_k.shape[2]
    q = attn.q_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    cos, sin = rope_tables(hd, torch.tensor([t if pos is None else pos]), attn.rope_theta)
    q = apply_rope(q, cos, sin)
    if rotate:
        k = apply_rope(k, cos, sin)
    new_k, new_v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
    keys, values = (new_k, new_v) if append else (cache_k, cache_v)
    out = F.scaled_dot_product_attention(q, keys, values, is_causal=causal, enable_gqa=True)
    out = attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
    if repeat_cache:
        g = attn.n_heads // attn.n_kv_heads
        new_k, new_v = new_k.repeat_interleave(g, 1), new_v.repeat_interleave(g, 1)
    return out, new_k, new_v


@wrong("03.3", "rotated at position 0")
def decode_position_zero(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, pos=0)


@wrong("03.3", "rotated at position 6")
def decode_position_off_by_one(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, pos=cache_k.shape[2] + 1)


@wrong("03.3", "the new key is not rotated")
def decode_unrotated_key(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, rotate=False)


@wrong("03.3", "see only position 0")
def decode_causal_mask(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, causal=True)


@wrong("03.3", "attends to the cached positions only")
def decode_attends_before_append(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, append=False)


@wrong("03.3", "store the 2 KV heads")
def decode_caches_repeated_heads(attn, x, cache_k, cache_v):
    return _decode(attn, x, cache_k, cache_v, repeat_cache=True)


@wrong("03.3", "did not grow")
def decode_returns_old_cache(attn, x, cache_k, cache_v):
    out, _, _ = _decode(attn, x, cache_k, cache_v)
    return out, cache_k, cache_v
