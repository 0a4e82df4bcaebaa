"""Checks of notebook 03's exercises (attention variants): RoPE, grouped-query attention, a KV-cache
decode step. The twins are transformers' Llama rotary embedding and attention layer and PyTorch's
F.scaled_dot_product_attention; nothing from dpo_lab.arch.attention is used as a reference, so a
bug there cannot hide the same bug in a student's solution."""
import torch
import torch.nn.functional as F

from dpo_lab.exercises import Wrong, exercise, expect_close


def _hf_rope(head_dim: int, theta: float, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE applied to x (batch, heads, seq, head_dim), from transformers."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    cos, sin = LlamaRotaryEmbedding(config)(x, positions.expand(x.shape[0], -1))
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def _variant_rope(x, positions, theta, interleaved=False, sign=1.0, exponent_scale=1.0):
    """RoPE written out with the classic mistakes switchable, to name the one a student made."""
    d = x.shape[-1]
    inv_freq = theta ** (-exponent_scale * torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = sign * positions.double()[:, None] * inv_freq[None, :]          # (seq, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if interleaved:  # pairs (x0, x1), (x2, x3), ... as in RoFormer / GPT-J
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    a, b = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _same(a, b, atol=1e-5):
    return torch.is_tensor(a) and a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-4)


@exercise("03.1", "rotary position embedding (RoPE)")
def check_rope(fn):
    """fn(x, positions, theta) -> x rotated, Llama's "rotate half" layout; vs transformers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    # positions that do not start at 0 (as when decoding) and two bases: each catches a mistake
    for positions, theta in ((torch.arange(7, 12), 10000.0), (torch.arange(3, 8), 500000.0)):
        got = fn(x.clone(), positions, theta)
        want = _hf_rope(x.shape[-1], theta, positions, x)
        if not torch.is_tensor(got) or got.shape != want.shape:
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise Wrong(f"return a tensor shaped like x {tuple(x.shape)}, got {shape}")
        if _same(got, want):
            continue
        if _same(got, x):
            raise Wrong("x comes back unrotated: multiply by cos and add rotate_half(x)·sin")
        if _same(got, _variant_rope(x, positions, theta, interleaved=True)):
            raise Wrong("you rotate adjacent pairs (x0, x1), (x2, x3)… (RoFormer's interleaved layout); "
                        "Llama rotates x_i with x_{i+d/2}: rotate_half(x) = cat(−x[d/2:], x[:d/2])")
        if _same(got, _variant_rope(x, positions, theta, sign=-1.0)):
            raise Wrong("the rotation goes the wrong way (by −angle): rotate_half(x) is cat(−x2, x1), "
                        "not cat(x2, −x1)")
        if _same(got, _variant_rope(x, torch.arange(len(positions)), theta)):
            raise Wrong("you rotate by the index in x (0, 1, 2…) instead of `positions` "
                        f"({positions[0].item()}, {positions[1].item()}…): at decode the new token sits at "
                        "position t, not 0")
        if _same(got, _variant_rope(x, positions, 10000.0)):
            raise Wrong("the base θ is ignored (you always use 10 000): Llama 3 uses 500 000")
        for scale in (2.0, 0.5):
            if _same(got, _variant_rope(x, positions, theta, exponent_scale=scale)):
                raise Wrong("the frequencies are off: θ^(−2i/d) for i = 0 … d/2−1, i.e. "
                            "theta ** (−arange(0, d, 2) / d)")
        expect_close(got, want, f"the rotated x (positions {positions[0].item()}…, θ={theta:g})", atol=1e-5)


@exercise("03.2", "grouped-query attention")
def check_gqa(fn):
    """fn(q, k, v) -> causal attention where k, v have fewer heads; vs SDPA with enable_gqa."""
    g = torch.Generator().manual_seed(0)
    # 6 query heads on 2 and 3 KV heads first: with 1 or 6 KV heads, h % kv and h // group agree
    for h, kv, s in ((6, 2, 5), (6, 3, 4), (4, 1, 6), (4, 4, 3)):
        q = torch.randn(2, h, s, 8, generator=g)
        k, v = torch.randn(2, kv, s, 8, generator=g), torch.randn(2, kv, s, 8, generator=g)
        got = fn(q, k, v)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        case = f"{h} query heads, {kv} KV heads"
        if not torch.is_tensor(got) or got.shape != want.shape:
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise Wrong(f"{case}: return (batch, heads, seq, head_dim) = {tuple(want.shape)}, got {shape}")
        if _same(got, want):
            continue
        group = h // kv
        tiled_k, tiled_v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        if _same(got, F.scaled_dot_product_attention(q, tiled_k, tiled_v, is_causal=True)):
            raise Wrong(f"{case}: heads are grouped as h % kv instead of h // group: query heads 0..{group - 1} "
                        "share KV head 0 (repeat_interleave along the head axis, not repeat)")
        if _same(got, F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)):
            raise Wrong(f"{case}: no causal mask: position t must not attend to positions after t")
        rep_k, rep_v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ rep_k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~torch.ones(s, s).tril().bool(), float("-inf"))
        if _same(got, scores.softmax(dim=-2) @ rep_v):
            raise Wrong(f"{case}: the softmax runs over the query axis: normalise each row over the keys (dim=-1)")
        if _same(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=1.0)):
            raise Wrong(f"{case}: the scores are not scaled: divide q·kᵀ by √d_head")
        if _same(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=1 / 8)):
            raise Wrong(f"{case}: the scores are divided by d_head; divide by √d_head")
        expect_close(got, want, f"{case}: the attention output", atol=1e-5)


def _hf_layer(attn):
    from dpo_lab.arch.attention_twins import hf_attention  # builds transformers' layer, no dpo_lab math
    theirs, rope = hf_attention("llama", attn.q_proj.in_features, attn.n_heads, attn.n_kv_heads, attn.rope_theta)
    theirs.load_state_dict(attn.state_dict())
    return theirs, rope


@exercise("03.3", "a KV-cache decode step")
@torch.no_grad()
def check_decode_step(fn):
    """fn(attn, x, cache_k, cache_v) -> (out, cache_k, cache_v) for one new token, vs transformers'
    LlamaAttention over the whole sequence (its last position) and its rotated keys."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from dpo_lab.arch.attention import Attention
    torch.manual_seed(0)
    attn = Attention(48, 6, 2).eval()          # 6 query heads, 2 KV heads, head_dim 8
    theirs, rope = _hf_layer(attn)
    b, t, hd = 2, 5, attn.head_dim
    x = torch.randn(b, t + 1, 48)
    cos, sin = rope(x, torch.arange(t + 1).expand(b, -1))
    mask = torch.full((t + 1, t + 1), float("-inf")).triu(1).expand(b, 1, t + 1, t + 1)
    want_out = theirs(x, position_embeddings=(cos, sin), attention_mask=mask)[0][:, t:]
    heads = lambda y, n: y.view(b, -1, n, hd).transpose(1, 2)
    q = heads(attn.q_proj(x), 6)
    k, v = heads(attn.k_proj(x), 2), heads(attn.v_proj(x), 2)
    q, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    res = fn(attn, x[:, t:].clone(), k_rot[:, :, :t].clone(), v[:, :, :t].clone())
    if not (isinstance(res, tuple) and len(res) == 3):
        raise Wrong("return a tuple (out, cache_k, cache_v)")
    out, ck, cv = res
    if not all(torch.is_tensor(r) for r in res):
        raise Wrong("out, cache_k and cache_v must be tensors")
    want_cache = (b, 2, t + 1, hd)
    if ck.dim() == 4 and ck.shape[1] == 6 and ck.shape[2] == t + 1:
        raise Wrong("the cache holds 6 heads: store the 2 KV heads (that is GQA's saving) and share them "
                    "across query heads only inside attention")
    if ck.dim() == 4 and ck.shape[:2] == (b, 2) and ck.shape[2] == t:
        raise Wrong(f"the cache did not grow: append the new key and value (torch.cat on the sequence "
                    f"axis), it must hold {t + 1} positions after the step")
    if tuple(ck.shape) != want_cache or tuple(cv.shape) != want_cache:
        raise Wrong(f"cache_k and cache_v must be (batch, kv_heads, t+1, head_dim) = {want_cache}, got "
                    f"{tuple(ck.shape)} and {tuple(cv.shape)}")
    if not (_same(ck[:, :, :t], k_rot[:, :, :t]) and _same(cv[:, :, :t], v[:, :, :t])):
        raise Wrong("the first t cached positions changed: keep them as they are and append the new one")
    if not _same(cv[:, :, t], v[:, :, t]):
        raise Wrong("the new value in the cache is wrong: it is v_proj(x) of the new token, not rotated")
    new_k = ck[:, :, t:]
    if not _same(new_k, k_rot[:, :, t:]):
        raw = k[:, :, t:]
        if _same(new_k, raw):  # rotating at position 0 is the identity, so this is either mistake
            raise Wrong(f"the new key is not rotated (or rotated at position 0): the cache holds keys "
                        f"rotated at their own position, here t = cache length = {t}")
        for p in (t - 1, t + 1):
            cp, sp = rope(x, torch.tensor([[p]]).expand(b, 1))
            if _same(new_k, apply_rotary_pos_emb(raw, raw, cp, sp)[0]):
                raise Wrong(f"the new token is rotated at position {p}; it sits at position t = cache "
                            f"length = {t} (positions 0..{t - 1} are cached)")
        expect_close(new_k, k_rot[:, :, t:], "the new key in the cache", atol=1e-5)
    if _same(out, want_out):
        return
    o = lambda a: attn.o_proj(a.transpose(1, 2).reshape(b, 1, -1))
    qt, kk, vv = q[:, :, t:], k_rot, v
    if _same(out, o(F.scaled_dot_product_attention(qt, kk, vv, is_causal=True, enable_gqa=True))):
        raise Wrong("is_causal=True with 1 query and t+1 keys lets the new token see only position 0 "
                    "(the mask is aligned top-left): one new token may attend to every cached position, "
                    "so pass no mask")
    if _same(out, o(F.scaled_dot_product_attention(qt, kk[:, :, :t], vv[:, :, :t], enable_gqa=True))):
        raise Wrong("the new token attends to the cached positions only: it must attend to itself too "
                    "(append to the cache before attending)")
    expect_close(out, want_out, "the output of the new token", atol=1e-5)
