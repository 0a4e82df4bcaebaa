"""Check our Attention against its twins: PyTorch's fused SDPA and transformers' Llama/Qwen2.

Both comparisons copy our weights into the other implementation and return the max absolute
difference of the layer output (fp32).
"""
import torch
import torch.nn.functional as F

from dpo_lab.arch.attention import Attention, apply_rope, rope_tables


def _inputs(dim, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g)


def _make(dim, n_heads, n_kv_heads, bias, theta, seed):
    torch.manual_seed(seed)
    attn = Attention(dim, n_heads, n_kv_heads, rope_theta=theta, bias=bias)
    if bias:  # nn.Linear biases start random already; make them visible in the output
        with torch.no_grad():
            for p in (attn.q_proj, attn.k_proj, attn.v_proj):
                p.bias.normal_(0, 0.5)
    return attn.eval()


@torch.no_grad()
def compare_with_sdpa(dim=64, n_heads=8, n_kv_heads=2, batch=2, seq=16, seed=0) -> float:
    """Our Attention vs the same projections and RoPE around F.scaled_dot_product_attention."""
    attn = _make(dim, n_heads, n_kv_heads, False, 10000.0, seed)
    x = _inputs(dim, batch, seq, seed)
    hd = attn.head_dim
    q = attn.q_proj(x).view(batch, seq, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    cos, sin = rope_tables(hd, torch.arange(seq), attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(batch, seq, -1))
    return (attn(x) - ref).abs().max().item()


def hf_attention(family: str, dim: int, n_heads: int, n_kv_heads: int, theta: float):
    """A transformers LlamaAttention or Qwen2Attention (built from a config: nothing downloaded)."""
    if family == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaAttention as Attn
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rope
        extra = {"attention_bias": False}
    elif family == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as Attn
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rope
        extra = {"use_sliding_window": False}
    else:
        raise ValueError(f"unknown family {family!r}; have llama, qwen2")
    # transformers 5.x keeps rope_theta under rope_parameters; head_dim is set explicitly.
    config = Config(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                    head_dim=dim // n_heads, intermediate_size=4 * dim, num_hidden_layers=1,
                    vocab_size=32, rope_parameters={"rope_type": "default", "rope_theta": theta},
                    attn_implementation="eager", **extra)
    return Attn(config, layer_idx=0).eval(), Rope(config)


@torch.no_grad()
def compare_with_transformers(family="llama", dim=64, n_heads=8, n_kv_heads=2, batch=2, seq=16,
                              theta=500000.0, seed=0, our_theta=None) -> float:
    """Our Attention vs transformers' attention layer holding the same weights.

    Llama has no projection biases; Qwen2 has biases on q, k, v (not o), like `bias=True` here.
    The eager kernel takes an additive mask, so we pass the causal one explicitly.
    `our_theta` (default: theta) lets a negative control give our side a different RoPE base.
    """
    bias = family == "qwen2"
    ours = _make(dim, n_heads, n_kv_heads, bias, theta if our_theta is None else our_theta, seed)
    theirs, rope = hf_attention(family, dim, n_heads, n_kv_heads, theta)
    theirs.load_state_dict(ours.state_dict())
    x = _inputs(dim, batch, seq, seed)
    position_ids = torch.arange(seq).expand(batch, seq)
    cos, sin = rope(x, position_ids)
    mask = torch.full((seq, seq), float("-inf")).triu(1).expand(batch, 1, seq, seq)
    out, _ = theirs(x, position_embeddings=(cos, sin), attention_mask=mask)
    return (ours(x) - out).abs().max().item()



def _head_probe(n_heads: int, n_kv_heads: int):
    """q, k, v whose attention output names, for each query head, the KV head it read.

    Query head i points at position i (q_i = 50·e_i, k_s = e_s: softmax ≈ one-hot on s = i);
    KV head j holds the value n_heads·j + s at position s. So output head i = n_heads·j(i) + i,
    and a kernel that mixes up query heads (scores of head i' ≠ i in slot i) shows up too.
    """
    eye = torch.eye(n_heads)
    q = (50 * eye).view(1, n_heads, 1, n_heads).expand(1, n_heads, n_heads, n_heads)
    k = eye.view(1, 1, n_heads, n_heads).expand(1, n_kv_heads, n_heads, n_heads)
    v = torch.zeros(1, n_kv_heads, n_heads, n_heads)
    v[..., 0] = n_heads * torch.arange(n_kv_heads).view(-1, 1) + torch.arange(n_heads).view(1, -1)
    return q.contiguous(), k.contiguous(), v


def _decode_probe(out_last: torch.Tensor, n_heads: int) -> list:
    """Output of the last position, (heads,) → KV head per query head; None if head i's output
    was not computed from query head i."""
    vals = out_last.round().long().tolist()
    return [v // n_heads if v % n_heads == i else None for i, v in enumerate(vals)]


@torch.no_grad()
def kv_head_of_query_head(n_heads: int, n_kv_heads: int) -> list:
    """Which KV head each query head reads in our `grouped_scaled_dot_product`, found by probing."""
    from dpo_lab.arch.attention import grouped_scaled_dot_product
    out = grouped_scaled_dot_product(*_head_probe(n_heads, n_kv_heads))  # (1, heads, seq, d)
    return _decode_probe(out[0, :, -1, 0], n_heads)


@torch.no_grad()
def hf_kv_head_of_query_head(n_heads: int, n_kv_heads: int) -> list:
    """The same probe through transformers' Llama `eager_attention_forward` (its `repeat_kv`
    copies each KV head n_heads / n_kv_heads times)."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward
    q, k, v = _head_probe(n_heads, n_kv_heads)
    seq = q.shape[2]
    mask = torch.full((seq, seq), float("-inf")).triu(1).view(1, 1, seq, seq)
    module = SimpleNamespace(num_key_value_groups=n_heads // n_kv_heads, training=False)
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return _decode_probe(out[0, -1, :, 0], n_heads)  # transformers returns (batch, seq, heads, d)
