"""The cost model reproduces published figures and is self-consistent."""
from dataclasses import replace

import pytest

from dpo_lab.parallel import cost


@pytest.mark.parametrize("psi,gb", [(1e9, 16), (7e9, 112), (70e9, 1120)])
def test_mixed_precision_16_bytes_per_parameter(psi, gb):
    parts = cost.model_state_bytes(psi, 0, 1, **cost.MIXED_PRECISION)
    assert sum(parts.values()) / cost.GB == pytest.approx(gb)


def test_zero_stages_match_paper_formulas():
    psi, nd, k = 7.5e9, 64, 12  # ZeRO paper, Figure 1: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    got = [sum(cost.model_state_bytes(psi, s, nd).values()) / cost.GB for s in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)
    assert sum(cost.model_state_bytes(psi, 1, nd).values()) == pytest.approx(4 * psi + k * psi / nd)
    assert sum(cost.model_state_bytes(psi, 2, nd).values()) == pytest.approx(2 * psi + (2 + k) * psi / nd)
    with pytest.raises(ValueError, match="zero_stage"):
        cost.model_state_bytes(psi, 4, nd)


def test_activations_bubble_and_alpha_beta():
    s, b, h, a = 2048, 1, 4096, 32
    plain = cost.activation_bytes_per_layer(s, b, h, a)
    assert plain == s * b * h * (34 + 5 * a * s / h)
    assert cost.activation_bytes_per_layer(s, b, h, a, tp=8, sp=True) == pytest.approx(plain / 8)
    assert cost.activation_bytes_per_layer(s, b, h, a, tp=1, sp=False) == plain
    assert cost.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert cost.bubble_ratio(4, 8, v=2) == pytest.approx(3 / 16)
    alpha, beta, n = 20e-6, 5e9, 4
    sizes = [2**k for k in range(10, 27, 2)]
    times = [cost.ring_all_reduce_time(S, n, alpha, beta) for S in sizes]
    fa, fb = cost.fit_alpha_beta(sizes, times, n)
    assert fa == pytest.approx(alpha, rel=1e-6) and fb == pytest.approx(beta, rel=1e-6)


def test_gpt_param_count_and_planning():
    assert cost.gpt_params(4096, 32, 32000) / 1e9 == pytest.approx(6.57, abs=0.05)
    qlora = cost.best_plan(cost.LLAMA_70B, "dpo_qlora", 8)
    full = cost.best_plan(cost.LLAMA_70B, "dpo_full", 8)
    assert qlora is not None and full is None or full[1]["total"] > qlora[1]["total"]
    plan, mem, _ = cost.best_plan(cost.LLAMA_405B, "dpo_full", 1024)
    assert plan.gpus == 1024 and mem["total"] <= 0.9 * cost.Hardware().memory_bytes
    assert cost.best_plan(cost.LLAMA_405B, "dpo_full", 8) is None  # 405B · 18 bytes ≫ 8 × 80 GB


def test_alpha_beta_times_by_hand():
    # 1 GB over 8 ranks, α = 10 µs, β = 100 GB/s: 7 steps of latency, 7/8 of the bytes
    assert cost.ring_all_gather_time(1e9, 8, 1e-5, 1e11) == pytest.approx(7e-5 + 0.00875, rel=1e-12)
    assert cost.ring_all_reduce_time(1e9, 8, 1e-5, 1e11) == pytest.approx(2 * (7e-5 + 0.00875), rel=1e-12)
    assert cost.ring_all_gather_time(1e9, 1, 1e-5, 1e11) == 0.0


def test_flops_per_token_by_hand():
    m = cost.LLAMA_7B  # N = 7e9, L = 32, h = 4096, s = 4096: 12·L·h·s = 6.442e9
    attn = 12 * 32 * 4096 * 4096
    assert cost.flops_per_token(m, "pretrain") == 6 * 7e9 + attn
    assert cost.flops_per_token(m, "dpo_full") == 6 * 7e9 + attn + 2 * 7e9 + attn / 3
    assert cost.flops_per_token(m, "dpo_qlora") == 4 * 7e9 + attn + 2 * 7e9 + attn / 3


def test_step_time_terms_by_hand():
    m, hw = cost.LLAMA_70B, cost.Hardware()
    plan = cost.Plan(dp=2, tp=4, pp=4, zero_stage=1, sp=True, micro_batches=8)
    t = cost.step_time(m, plan, "pretrain", global_batch=64, hw=hw)
    tokens = 64 * m.seq
    flops = (6 * m.params + 12 * m.layers * m.hidden * m.seq) * tokens
    assert t["compute"] == pytest.approx(flops / (32 * hw.peak_flops * hw.mfu) * (1 + 3 / 8), rel=1e-12)
    act = 2 * m.seq * (64 / 2) * m.hidden  # bf16 (s, b, h) per DP rank
    per_all_reduce = 2 * 3 * hw.intra_alpha + 2 * 3 / 4 * act / hw.intra_beta
    assert t["tp_comm"] == pytest.approx(4 * (m.layers / 4) * per_all_reduce, rel=1e-12)
    grads = 2 * m.params / 16  # bf16 gradients of this rank's TP·PP share, all-reduced over DP = 2
    assert t["dp_comm"] == pytest.approx(2 * hw.inter_alpha + grads / hw.inter_beta, rel=1e-12)


def test_memory_terms_by_hand():
    m = cost.LLAMA_7B
    plan = cost.Plan(dp=4, tp=2, pp=4, zero_stage=1, micro_batches=8)
    mem = cost.memory_per_gpu(m, plan, "dpo_full", attention="eager")
    assert mem["reference"] == 2 * 7e9 / 8  # a bf16 copy, split by TP·PP
    # 1F1B: 4 micro-batches in flight on the first stage, 8 layers each, chosen + rejected = 2 sequences
    per_layer = m.seq * 2 * m.hidden * (10 + 24 / 2 + 5 * m.heads * m.seq / (m.hidden * 2))
    assert mem["activations"] == pytest.approx(per_layer * 8 * 4, rel=1e-12)
    # the last stage (1 micro-batch + logits: 2 sequences × s × V × 14 bytes / t) is the lighter one here
    logits = 2 * m.seq * m.vocab * 14 / 2
    assert per_layer * 8 + logits < per_layer * 8 * 4 and mem["logits"] == 0
    one_stage = cost.memory_per_gpu(m, cost.Plan(dp=4, tp=2, zero_stage=1), "dpo_full", attention="eager")
    assert one_stage["logits"] == logits and one_stage["activations"] == pytest.approx(per_layer * 32, rel=1e-12)
    sdpa = cost.memory_per_gpu(m, plan, "dpo_full")  # the default: no s² scores stored
    assert sdpa["activations"] < mem["activations"]
    assert cost.memory_per_gpu(m, cost.Plan(dp=4, zero_stage=3), "dpo_full")["reference"] == 2 * 7e9 / 4


def test_recomputation_costs_one_more_forward():
    # with the paper's eager attention, the fastest plan that fits 70B full DPO on 64 GPUs recomputes
    plan, _, t = cost.best_plan(cost.LLAMA_70B, "dpo_full", 64, attention="eager")
    assert plan.checkpointing
    plain = cost.step_time(cost.LLAMA_70B, replace(plan, checkpointing=False), "dpo_full")
    assert t["compute"] == pytest.approx(plain["compute"] * 4 / 3, rel=1e-12)
    assert t["total"] == pytest.approx(t["compute"] + plain["dp_comm"] + plain["tp_comm"], rel=1e-12)


def test_sdpa_keeps_no_scores():
    s, b, h, a = 2048, 2, 4096, 32
    eager = cost.activation_bytes_per_layer(s, b, h, a)  # the paper's count is the default here
    assert eager == cost.activation_bytes_per_layer(s, b, h, a, attention="eager")
    # FlashAttention keeps one fp32 log-sum-exp per query and head (4asb) instead of 5as²b
    assert cost.activation_bytes_per_layer(s, b, h, a, attention="sdpa") == s * b * h * 34 + 4 * a * s * b
    assert cost.activation_bytes_per_layer(s, b, h, a, 8, False, "sdpa") == pytest.approx(
        s * b * h * (10 + 24 / 8) + 4 * a * s * b / 8, rel=1e-12)
    assert cost.activation_bytes_per_layer(s, b, h, a, 8, True, "sdpa") == pytest.approx(
        (s * b * h * 34 + 4 * a * s * b) / 8, rel=1e-12)
    with pytest.raises(ValueError, match="'flash'"):
        cost.activation_bytes_per_layer(s, b, h, a, attention="flash")


def test_logits_bytes_by_hand():
    # one 7B DPO pair of 2048 tokens, bf16 logits, reference after the policy: 4 + (2 + 4 + 4) bytes
    assert cost.logits_bytes(2048, 2, 32000, reference_after=True) == 2 * 2048 * 32000 * 14
    # without a reference pass the backward's three fp32 copies set the peak
    assert cost.logits_bytes(2048, 1, 32000) == 2048 * 32000 * 12
    assert cost.logits_bytes(2048, 2, 32000, logit_bytes=4, reference_after=True) == 2 * 2048 * 32000 * 12
    assert cost.logits_bytes(2048, 2, 32000, tp=8, reference_after=True) == 2 * 2048 * 32000 * 14 / 8
    with pytest.raises(ValueError, match="vocab"):
        cost.logits_bytes(2048, 2, 0)


def test_tree_and_ring_all_reduce():
    # 8 ranks, α = 10 µs, β = 100 GB/s: the tree pays 2·log₂8 = 6 latencies and 2S/β
    assert cost.tree_all_reduce_time(1e9, 8, 1e-5, 1e11) == pytest.approx(6e-5 + 0.02, rel=1e-12)
    assert cost.tree_all_reduce_time(1e9, 1, 1e-5, 1e11) == 0.0
    small, large = 1e3, 1e9
    assert cost.all_reduce_time(small, 8, 1e-5, 1e11) == cost.tree_all_reduce_time(small, 8, 1e-5, 1e11)
    assert cost.all_reduce_time(large, 8, 1e-5, 1e11) == cost.ring_all_reduce_time(large, 8, 1e-5, 1e11)


def test_overlap_hides_data_parallel_traffic_only():
    m, plan = cost.LLAMA_7B, cost.Plan(dp=16, tp=8, pp=1, zero_stage=3, sp=True)
    t0 = cost.step_time(m, plan, "dpo_full", 64)
    assert t0["dp_comm_hidden"] == 0 and t0["total"] == pytest.approx(t0["compute"] + t0["dp_comm"] + t0["tp_comm"])
    half = cost.step_time(m, plan, "dpo_full", 64, overlap=0.5)
    hidden = 0.5 * min(t0["dp_comm"], t0["compute"])
    assert half["total"] == pytest.approx(t0["total"] - hidden, rel=1e-12)
    full = cost.step_time(m, plan, "dpo_full", 64, overlap=1.0)
    assert full["total"] == pytest.approx(max(t0["compute"], t0["dp_comm"]) + t0["tp_comm"], rel=1e-12)
    with pytest.raises(ValueError, match="1.5"):
        cost.step_time(m, plan, "dpo_full", 64, overlap=1.5)


def test_rank_plans_fastest_first_and_all_fit():
    hw = cost.Hardware()
    ranked = cost.rank_plans(cost.LLAMA_70B, "dpo_full", 64, hw, 128)
    assert len(ranked) > 5
    times = [t["total"] for _, _, t in ranked]
    assert times == sorted(times)
    assert all(mem["total"] <= 0.9 * hw.memory_bytes and plan.gpus == 64 for plan, mem, _ in ranked)
    assert not any(plan.dp == 1 and plan.zero_stage for plan, _, _ in ranked)
    assert cost.best_plan(cost.LLAMA_70B, "dpo_full", 64, hw, 128)[0] == ranked[0][0]
    # every time is step_time's for that plan (no adjustment made outside it)
    plan, _, t = ranked[3]
    assert t == cost.step_time(cost.LLAMA_70B, plan, "dpo_full", 128, hw)


@pytest.mark.parametrize("double", [True, False])
def test_nf4_bits_match_bitsandbytes_and_the_dpo_planner(double):
    """Lesson 10's bits per 4-bit weight against what bitsandbytes stores for a large tensor, and
    against the DPO memory planner's whole-byte count of the same layout (lesson 14)."""
    import bitsandbytes.functional as F
    import torch

    from dpo_lab.dpo.qlora import quant_constants_bytes
    from dpo_lab.memory import planner
    n = 64 * 256 * 64  # whole blocks and whole second-level groups: no rounding up
    packed, qs = F.quantize_4bit(torch.randn(n), blocksize=64, compress_statistics=double, quant_type="nf4")
    c = quant_constants_bytes(qs)
    stored = packed.numel() * packed.element_size() + c["absmax"] + c["absmax2"]  # code tables and offset aside
    bits = cost.quantised_bits_per_param(64, double)
    assert bits * n / 8 == pytest.approx(stored - (4 if double else 0), abs=0.5)  # the fp32 offset: 4 bytes per tensor
    planned = planner.quantised_bytes(n, 4, double)
    assert planned["packed"] + planned["constants"] == stored
    if double:
        assert cost.NF4_BITS == bits and round(bits, 3) == 4.127  # the figure lesson 10 quotes
