"""What MHA, GQA and MQA cost: KV-cache bytes, parameters and FLOPs, measured and by formula.

KV cache = 2 (K and V) · layers · kv_heads · head_dim · seq · batch · bytes_per_element.
Only kv_heads changes between the variants, so GQA with g groups stores kv_heads/heads of
MHA's cache, and MQA 1/heads.
"""
import torch

from dpo_lab.arch.attention import KVCache

# Published shapes (config.json of each model): layers, query heads, KV heads, head_dim.
PUBLISHED = {
    "Llama-2-7B": {"layers": 32, "heads": 32, "kv_heads": 32, "head_dim": 128, "dim": 4096},
    "Llama-3-8B": {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "dim": 4096},
    "Qwen2.5-72B": {"layers": 80, "heads": 64, "kv_heads": 8, "head_dim": 128, "dim": 8192},
}
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, seq: int, batch: int = 1,
                   bytes_per_elem: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * seq * batch * bytes_per_elem


def published_kv_table(contexts=(4096, 32768, 131072), batch: int = 1, bytes_per_elem: int = 2):
    """Rows {model, context, kv_heads, gib}: the bf16 cache of one sequence at each context."""
    rows = []
    for name, c in PUBLISHED.items():
        for s in contexts:
            b = kv_cache_bytes(c["layers"], c["kv_heads"], c["head_dim"], s, batch, bytes_per_elem)
            rows.append({"model": name, "context": s, "kv_heads": c["kv_heads"], "bytes": b,
                         "gib": b / 2**30})
    return rows


@torch.no_grad()
def measure_cache_bytes(model, batch: int, seq: int, seed: int = 0) -> int:
    """Run a prefill of `seq` tokens through `model` with a KVCache and return cache.nbytes()."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.embed.num_embeddings, (batch, seq), generator=g)
    cache = KVCache()
    model.eval()(tokens, cache)
    return cache.nbytes()


def cache_formula_error(model, batch: int, seq: int) -> int:
    """|measured KVCache.nbytes() − formula| for a TinyTransformer; 0 when the formula is exact."""
    attn = model.blocks[0].attn
    dtype_bytes = next(model.parameters()).element_size()
    formula = kv_cache_bytes(len(model.blocks), attn.n_kv_heads, attn.head_dim, seq, batch, dtype_bytes)
    return abs(measure_cache_bytes(model, batch, seq) - formula)


@torch.no_grad()
def decode_vs_full(model, batch: int = 2, seq: int = 24, prefill: int = 8, seed: int = 0) -> float:
    """Max |logits| difference between one full forward and prefill + token-by-token decoding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.embed.num_embeddings, (batch, seq), generator=g)
    model.eval()
    full = model(tokens)
    cache = KVCache()
    steps = [model(tokens[:, :prefill], cache)]
    for t in range(prefill, seq):
        steps.append(model(tokens[:, t:t + 1], cache))
    return (torch.cat(steps, dim=1) - full).abs().max().item()


def attention_params(dim: int, heads: int, kv_heads: int) -> int:
    """q and o are dim×dim; k and v are dim×(kv_heads·head_dim) each (no biases)."""
    head_dim = dim // heads
    return 2 * dim * dim + 2 * dim * kv_heads * head_dim


def attention_flops_per_token(dim: int, heads: int, kv_heads: int, context: int) -> dict:
    """Forward FLOPs of one decoded token in one layer (2 per multiply-add).

    Projections shrink with kv_heads; the scores q·kᵀ and the weighted sum of v do not: every
    query head still attends over the whole context, so GQA saves memory, not attention FLOPs.
    """
    head_dim = dim // heads
    projections = 2 * attention_params(dim, heads, kv_heads)
    core = 2 * 2 * heads * head_dim * context  # q·kᵀ and p·v
    cache_read = 2 * kv_heads * head_dim * context  # elements of K and V read per token
    return {"projection_flops": projections, "attention_flops": core, "flops": projections + core,
            "kv_elements_read": cache_read}


def variant_table(dim: int = 4096, heads: int = 32, context: int = 4096, bytes_per_elem: int = 2):
    """Parameters, FLOPs and KV traffic per layer for MHA, GQA-8 and MQA at the same width."""
    rows = []
    for name, kv in (("MHA", heads), ("GQA-8", 8), ("MQA", 1)):
        f = attention_flops_per_token(dim, heads, kv, context)
        rows.append({"variant": name, "kv_heads": kv, "params": attention_params(dim, heads, kv),
                     "flops_per_token": f["flops"], "attention_flops": f["attention_flops"],
                     "kv_bytes_read_per_token": f["kv_elements_read"] * bytes_per_elem,
                     # FLOPs per byte of cache read in the attention core: low = memory-bound
                     "attention_intensity": f["attention_flops"] / (f["kv_elements_read"] * bytes_per_elem)})
    return rows


def random_cache(model, batch: int, seq: int, dtype=torch.float32, seed: int = 0) -> KVCache:
    """A KVCache holding `seq` random positions for every layer: lets a decode benchmark start
    at a long context without paying for the prefill."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache()
    for i, block in enumerate(model.blocks):
        a = block.attn
        shape = (batch, a.n_kv_heads, seq, a.head_dim)
        cache.update(i, torch.randn(*shape, generator=g, dtype=dtype),
                     torch.randn(*shape, generator=g, dtype=dtype))
    return cache


def decode_bytes_per_step(model, context: int, batch: int, cache_passes: int = 1) -> dict:
    """Bytes one cached decoding step moves: weights + `cache_passes` × the KV cache.

    Every step reads every weight once (the embedding table only for the `batch` looked-up rows)
    and the K and V of all `context` positions. `cache_passes=1` is an ideal preallocated cache;
    our KVCache grows by torch.cat, which also reads and writes the whole cache: 3 passes.
    """
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
    weights = (weights + batch * model.embed.embedding_dim) * elem
    attn = model.blocks[0].attn
    cache = kv_cache_bytes(len(model.blocks), attn.n_kv_heads, attn.head_dim, context, batch, elem)
    return {"weights": weights, "cache": cache, "total": weights + cache_passes * cache}
