"""Figures of notebooks/03_attention_variants.ipynb (smoke profile)."""
import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def fig(run_nb):
    return run_nb("03_attention_variants")["figures"]


def test_equals_sdpa_and_transformers(fig):
    assert 0 <= fig["max_abs_diff_vs_sdpa"] <= 1e-5
    assert 0 <= fig["max_abs_diff_vs_transformers"] <= 1e-5
    assert fig["transformers_diff_wrong_rope_theta"] > 1e-3  # the comparison can fail


def test_kv_cache(fig):
    assert fig["decode_vs_full_max_abs_diff"] <= 1e-5
    assert fig["kv_cache_bytes_formula_error"] == 0


@pytest.mark.parametrize("key,gib", [("llama_2_7b_4k", 2.0), ("llama_2_7b_128k", 64.0),
                                     ("llama_3_8b_4k", 0.5), ("llama_3_8b_32k", 4.0),
                                     ("llama_3_8b_128k", 16.0), ("qwen2_5_72b_4k", 1.25),
                                     ("qwen2_5_72b_128k", 40.0)])
def test_published_kv_cache(fig, key, gib):
    assert fig[f"kv_cache_gib_{key}"] == pytest.approx(gib)


def test_params_and_flops_per_variant(fig):
    # width 4096, 32 heads: q,o = 2d², k,v = 2d·kv·128
    assert fig["params_ratio_gqa8_vs_mha"] == pytest.approx((2 + 2 * 8 / 32) / 4)
    assert fig["params_ratio_mqa_vs_mha"] == pytest.approx((2 + 2 / 32) / 4)
    assert fig["attention_flops_ratio_gqa8_vs_mha"] == 1.0
    assert fig["attention_flops_ratio_mqa_vs_mha"] == 1.0
    # total = projections 2·params (shrink) + core 4·d·s (stays): d = s = 4096, so core = d²·4
    assert fig["flops_ratio_gqa8_vs_mha"] == pytest.approx((2 * 2.5 + 4) / 12)
    assert fig["flops_ratio_mqa_vs_mha"] == pytest.approx((2 * (2 + 2 / 32) + 4) / 12)
    assert fig["kv_bytes_ratio_gqa8_vs_mha"] == pytest.approx(0.25)
    assert fig["kv_bytes_ratio_mqa_vs_mha"] == pytest.approx(1 / 32)


def test_query_heads_read_the_kv_head_repeat_kv_gives_them(fig):
    assert fig["kv_head_map_mismatches_vs_repeat_kv"] == 0


def test_decode_speedup_is_reported(fig):
    # Wall-clock speed depends on the machine's load: reported, never held to a bound. What makes
    # MQA faster, fewer KV bytes read per token (kv_bytes_ratio_*), is asserted above.
    for k in ("gqa2", "mqa"):
        assert 0 < fig[f"decode_speedup_{k}_vs_mha_longest_context"] < float("inf")
    assert fig["decode_spread_max"] >= 0


def test_decode_bytes_model(fig):
    # every step also reads the weights, the same for all variants: the predicted speed-up stays
    # below the KV-cache ratio (4× GQA-2, 8× MQA); exact values in tests/test_attention.py
    assert 1 < fig["decode_predicted_speedup_gqa2_longest_context"] < 4
    assert fig["decode_predicted_speedup_gqa2_longest_context"] < fig["decode_predicted_speedup_mqa_longest_context"] < 8


def test_uptraining(fig):
    kvs = sorted(int(k.split("_")[1][2:]) for k in fig if k.startswith("uptrain_kv") and k.endswith("_converted_loss"))
    assert kvs
    mha = fig["uptrain_mha_loss"]
    assert mha < 0.1  # the MHA model learned to copy
    for kv in kvs:
        converted, up, scratch = (fig[f"uptrain_kv{kv}_{s}_loss"] for s in ("converted", "uptrained", "scratch"))
        assert converted > mha + 1.0         # pooling K/V heads hurts at first...
        assert up < 0.5 * converted          # ...brief training recovers most of it...
        assert up < scratch - 0.5            # ...far better than the same steps from scratch
        # the equal-compute control trained for pre-training + uptraining steps, and learned to copy
        assert fig[f"uptrain_kv{kv}_scratch_equal_loss"] < 0.1
    assert 0 < fig["uptrain_steps_fraction"] <= 0.25


def test_every_exercise_passes(fig):
    assert_every_check_passes(fig)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("03_attention_variants"))
