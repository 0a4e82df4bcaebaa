"""Attention variants vs SDPA and transformers, the KV cache and its formula, MHA→GQA pooling."""
import pytest
import torch

from dpo_lab.arch import attention_costs as costs
from dpo_lab.arch.attention import Attention, grouped_scaled_dot_product, scaled_dot_product
from dpo_lab.arch.attention_twins import compare_with_sdpa, compare_with_transformers
from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.arch.uptrain import mha_to_gqa, pool_heads


@pytest.mark.parametrize("kv", [8, 4, 2, 1])
def test_equals_sdpa(kv):
    assert compare_with_sdpa(n_kv_heads=kv) <= 1e-5


@pytest.mark.parametrize("family,theta", [("llama", 500000.0), ("qwen2", 1e6)])
@pytest.mark.parametrize("kv", [8, 2, 1])
def test_equals_transformers(family, theta, kv):
    assert compare_with_transformers(family, n_kv_heads=kv, theta=theta) <= 1e-5


def test_transformers_comparison_detects_a_wrong_rope_base():
    assert compare_with_transformers("llama", n_kv_heads=2, our_theta=10000.0) > 1e-3


@pytest.mark.parametrize("q_offset,sq", [(0, 6), (5, 1), (3, 3)])
def test_grouped_attention_equals_repeated_heads(q_offset, sq):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, sq, 16, generator=g)
    k, v = torch.randn(2, 2, 2, q_offset + sq, 16, generator=g)
    expected = scaled_dot_product(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                  causal=True, q_offset=q_offset)
    torch.testing.assert_close(grouped_scaled_dot_product(q, k, v, q_offset=q_offset), expected)
    with pytest.raises(ValueError, match="3 KV heads"):
        grouped_scaled_dot_product(q, torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_cached_decoding_equals_full_forward(kv):
    torch.manual_seed(0)
    model = TinyTransformer(64, 32, 2, 4, kv)
    assert costs.decode_vs_full(model) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv", [4, 1])
def test_cache_bytes_equal_formula(kv, dtype):
    model = TinyTransformer(64, 32, 3, 4, kv).to(dtype)
    measured = costs.measure_cache_bytes(model, batch=2, seq=5)
    head_dim = 32 // 4
    assert measured == 2 * 3 * kv * head_dim * 5 * 2 * (4 if dtype == torch.float32 else 2)
    assert costs.cache_formula_error(model, 2, 5) == 0


def test_published_cache_sizes():
    gib = {(r["model"], r["context"]): r["gib"] for r in costs.published_kv_table()}
    assert gib[("Llama-2-7B", 4096)] == 2.0           # 2·32·32·128·4096·2 bytes
    assert gib[("Llama-3-8B", 131072)] == 16.0        # GQA-8: a quarter of Llama-2's 64 GiB
    assert gib[("Qwen2.5-72B", 32768)] == 10.0


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_param_count_formula_matches_module(kv):
    assert costs.attention_params(256, 8, kv) == sum(p.numel() for p in Attention(256, 8, kv).parameters())


def test_attention_core_flops_do_not_depend_on_kv_heads():
    f = [costs.attention_flops_per_token(1024, 16, kv, 2048) for kv in (16, 4, 1)]
    assert f[0]["attention_flops"] == f[1]["attention_flops"] == f[2]["attention_flops"]
    assert f[0]["kv_elements_read"] == 4 * f[1]["kv_elements_read"] == 16 * f[2]["kv_elements_read"]
    assert f[0]["projection_flops"] > f[1]["projection_flops"] > f[2]["projection_flops"]


def test_pool_heads_means_each_group():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(8, 3)  # 4 heads of head_dim 2
    pooled = pool_heads(w, 2, 2)
    torch.testing.assert_close(pooled[:2], (w[0:2] + w[2:4]) / 2)
    torch.testing.assert_close(pooled[2:], (w[4:6] + w[6:8]) / 2)
    with pytest.raises(ValueError, match="3 KV heads"):
        pool_heads(w, 3, 2)


def test_conversion_is_exact_when_group_heads_agree():
    torch.manual_seed(0)
    mha = TinyTransformer(32, 32, 2, 4, 4).eval()
    hd = 8
    with torch.no_grad():  # make heads (0,1) and (2,3) share K and V: pooling then loses nothing
        for block in mha.blocks:
            for proj in (block.attn.k_proj, block.attn.v_proj):
                w = proj.weight.view(2, 2, hd, 32)
                w[:, 1] = w[:, 0]
    gqa = mha_to_gqa(mha, 2).eval()
    assert gqa.blocks[0].attn.k_proj.weight.shape == (2 * hd, 32)
    tokens = torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(gqa(tokens), mha(tokens))
    assert mha_to_gqa(mha, 1).config["n_kv_heads"] == 1


def test_decode_benchmark_helper_runs():
    from dpo_lab.bench.attention import decode_tokens_per_s
    model = TinyTransformer(32, 32, 1, 4, 2).eval()
    assert decode_tokens_per_s(model, 16, 2, 2, 1, torch.device("cpu")) > 0


def test_decode_bytes_per_step_counts_weights_and_cache_passes():
    model = TinyTransformer(256, 512, 2, 8, 2)  # head_dim 64, MLP hidden 2048
    b = costs.decode_bytes_per_step(model, context=100, batch=4, cache_passes=3)
    d, h = 512, 2048
    block = 2 * d * d + 2 * d * 2 * 64 + (d * h + h) + (h * d + d) + 2 * d   # attn, MLP, 2 norms
    weights = 2 * block + d + 256 * d + 4 * d   # + final norm, head, the 4 embedding rows looked up
    cache = 2 * 2 * 2 * 64 * 100 * 4            # K,V · layers · kv heads · head_dim · context · batch
    assert b == {"weights": weights * 4, "cache": cache * 4, "total": (weights + 3 * cache) * 4}


@pytest.mark.parametrize("kv", [8, 4, 2, 1])
def test_kv_head_map_equals_transformers_repeat_kv(kv):
    from dpo_lab.arch.attention_twins import hf_kv_head_of_query_head, kv_head_of_query_head
    assert kv_head_of_query_head(8, kv) == hf_kv_head_of_query_head(8, kv)
    assert kv_head_of_query_head(8, kv) == [i // (8 // kv) for i in range(8)]


def test_decode_timer_returns_one_time_per_repeat_and_names_bad_input():
    from dpo_lab.bench.attention import decode_seconds_per_token
    model = TinyTransformer(32, 32, 1, 4, 2).eval()
    times = decode_seconds_per_token(model, 16, 2, new_tokens=2, repeat=3, device=torch.device("cpu"))
    assert len(times) == 3 and all(t > 0 for t in times)
    with pytest.raises(ValueError, match="repeat=0"):
        decode_seconds_per_token(model, 16, 2, new_tokens=2, repeat=0, device=torch.device("cpu"))
