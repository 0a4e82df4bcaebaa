"""The cost model reproduces published figures and is self-consistent."""
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
