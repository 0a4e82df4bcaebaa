"""Cached decoding speed of MHA, GQA and MQA at growing context lengths.

`dpo-lab bench attention [--quick]`. Same width and query heads, only the KV heads change.
Decoding one token reads the whole KV cache of every layer but does little arithmetic per byte
read, so time per token follows the cache size: fewer KV heads, less to read, faster decoding
(the FLOPs of q·kᵀ and p·v do not change with the number of KV heads).
"""
import statistics
import time

import torch

from dpo_lab.arch.attention_costs import kv_cache_bytes, random_cache
from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.bench import Table
from dpo_lab.runtime import default_device

DIM, HEADS, LAYERS, VOCAB = 1024, 16, 2, 1024
VARIANTS = {"MHA": HEADS, "GQA-4": 4, "MQA": 1}


@torch.no_grad()
def decode_seconds_per_token(model, context: int, batch: int, new_tokens: int, repeat: int, device,
                             warmup: int = 1) -> list[float]:
    """Seconds per decoding step (one token for each of `batch` sequences), once per repeat.

    Every repeat starts from the same cache of `context` random positions and decodes
    `new_tokens` steps; the list of `repeat` values gives the median and the spread.
    """
    if min(new_tokens, repeat) < 1:
        raise ValueError(f"new_tokens={new_tokens} and repeat={repeat} must be >= 1")
    cache = random_cache(model, batch, context)
    for layer in cache.k:
        cache.k[layer], cache.v[layer] = cache.k[layer].to(device), cache.v[layer].to(device)
    start_k, start_v = dict(cache.k), dict(cache.v)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeat):
        cache.k, cache.v = dict(start_k), dict(start_v)  # back to `context` positions
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            model(token, cache)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) / new_tokens)
    return times


def decode_tokens_per_s(model, context: int, batch: int, new_tokens: int, repeat: int, device) -> float:
    """Tokens/s (over the batch) of decoding `new_tokens` after a cache holding `context` positions:
    the median over `repeat` runs."""
    times = decode_seconds_per_token(model, context, batch, new_tokens, repeat, device)
    return batch / statistics.median(times)


def run(quick: bool = False) -> Table:
    device = default_device()
    contexts = [256, 1024, 4096] if quick else [512, 2048, 8192, 16384]
    batch = 4
    rows = []
    for context in contexts:
        for name, kv in VARIANTS.items():
            torch.manual_seed(0)
            model = TinyTransformer(VOCAB, DIM, LAYERS, HEADS, kv).to(device).eval()
            times = decode_seconds_per_token(model, context, batch, new_tokens=8 if quick else 16,
                                             repeat=5 if quick else 9, device=device)
            mib = kv_cache_bytes(LAYERS, kv, DIM // HEADS, context, batch, 4) / 2**20
            med = statistics.median(times)
            # spread: slowest minus fastest repeat, relative to the median (a noisy machine shows here)
            rows.append({"variant": name, "context": context, "kv_heads": kv, "cache_MiB": mib,
                         "tokens_per_s": batch / med, "spread": (max(times) - min(times)) / med})
    return Table(f"Cached decoding, {LAYERS} layers, dim {DIM}, {HEADS} query heads, batch {batch}, fp32",
                 rows, metric="tokens_per_s", baseline="MHA", group_by=("context",),
                 higher_is_better=True, notes={"device": str(device)})
