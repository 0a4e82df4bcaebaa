"""Cached decoding speed of MHA, GQA and MQA at growing context lengths.

`dpo-lab bench attention [--quick]`. Same width and query heads, only the KV heads change.
Decoding one token reads the whole KV cache of every layer but does little arithmetic per byte
read, so time per token follows the cache size: fewer KV heads, less to read, faster decoding
(the FLOPs of q·kᵀ and p·v do not change with the number of KV heads).
"""
import torch

from dpo_lab.arch.attention_costs import kv_cache_bytes, random_cache
from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.bench import Table, median_time
from dpo_lab.runtime import default_device

DIM, HEADS, LAYERS, VOCAB = 1024, 16, 2, 1024
VARIANTS = {"MHA": HEADS, "GQA-4": 4, "MQA": 1}


@torch.no_grad()
def decode_tokens_per_s(model, context: int, batch: int, new_tokens: int, repeat: int, device) -> float:
    """Tokens/s (over the batch) of decoding `new_tokens` after a cache holding `context` positions."""
    cache = random_cache(model, batch, context)
    for layer in cache.k:
        cache.k[layer], cache.v[layer] = cache.k[layer].to(device), cache.v[layer].to(device)
    start_k, start_v = dict(cache.k), dict(cache.v)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def decode():
        cache.k, cache.v = dict(start_k), dict(start_v)  # back to `context` positions
        for _ in range(new_tokens):
            model(token, cache)
    return batch * new_tokens / median_time(decode, warmup=1, repeat=repeat, sync=sync)


def run(quick: bool = False) -> Table:
    device = default_device()
    contexts = [256, 1024, 4096] if quick else [512, 2048, 8192, 16384]
    batch = 4
    rows = []
    for context in contexts:
        for name, kv in VARIANTS.items():
            torch.manual_seed(0)
            model = TinyTransformer(VOCAB, DIM, LAYERS, HEADS, kv).to(device).eval()
            tps = decode_tokens_per_s(model, context, batch, new_tokens=4 if quick else 8,
                                      repeat=3 if quick else 5, device=device)
            mib = kv_cache_bytes(LAYERS, kv, DIM // HEADS, context, batch, 4) / 2**20
            rows.append({"variant": name, "context": context, "kv_heads": kv,
                         "cache_MiB": mib, "tokens_per_s": tps})
    return Table(f"Cached decoding, {LAYERS} layers, dim {DIM}, {HEADS} query heads, batch {batch}, fp32",
                 rows, metric="tokens_per_s", baseline="MHA", group_by=("context",),
                 higher_is_better=True, notes={"device": str(device)})
