import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("12_optimizers_and_stability")["figures"]


def test_adamw_equals_torch(figures):
    # float32, 30 steps of a real model: only rounding differs (~1e-7 per step, Adam's 1/√v̂ can
    # amplify it where v̂ is tiny); a slip in the formula (bias correction, decay) moves θ by ~lr = 1e-2
    assert figures["adamw_vs_torch_max_abs_diff"] <= 1e-4
    assert figures["adam_l2_vs_torch_max_abs_diff"] <= 1e-4


def test_decoupled_decay_is_the_same_for_every_weight_and_l2_is_not(figures):
    target = (1 - 1e-3) ** 300  # (1 − ηλ)^300 = 0.741
    # the zero-mean gradient moves θ by at most ~η·(1−β1)-sized wiggles: 0.03 around the target
    assert figures["decoupled_small_grad"] == pytest.approx(target, abs=0.03)
    assert figures["decoupled_large_grad"] == pytest.approx(target, abs=0.03)
    assert figures["l2_small_grad"] < 0.1          # driven to 0 at ~η per step
    # λθ/√v̂ with √v̂ ≈ 10: ≈ (1 − 1e-4)^300 = 0.97, less the wiggle of the alternating gradient;
    # far from the decoupled 0.74
    assert figures["l2_large_grad"] > 0.9


def test_bad_batches_spike_and_the_cures_that_bound_the_update_remove_them(figures):
    seeds = figures["spike_seeds"]
    assert figures["spikes_without_cures"] >= seeds  # every seed spikes
    assert figures["spikes_with_clipping"] <= figures["spikes_without_cures"]
    assert figures["spikes_skip_batch"] == 0 and figures["spikes_all"] == 0
    assert figures["final_loss_all_mean"] < figures["final_loss_none_mean"]
    # the mechanism the lesson explains: the burst's gradients are several times the usual ones
    assert figures["max_grad_norm_none_mean"] > 3 * figures["median_grad_norm_none_mean"]
    assert figures["max_update_norm_after_burst_beta2"] < figures["max_update_norm_after_burst_none"]


def test_muon(figures):
    assert figures["sv_before_ratio"] > 10
    # the quintic's band: Jordan's coefficients leave σ in about [0.68, 1.14] (tests/test_optim.py)
    assert 0.6 < figures["sv_after_min"] and figures["sv_after_max"] < 1.25
    # torch runs Newton–Schulz in bf16, we in fp32: our difference from torch must be torch's own
    # rounding error, measured on this model's gradients against a float64 iteration (a few %: the
    # gradients are ill-conditioned, and the iteration's slope of 3.4 at 0 amplifies the rounding of
    # the small singular directions); ×2 because the 3 compared steps see other (Nesterov) inputs.
    # A slip (no Nesterov, no √(rows/cols), cubic coefficients) moves the update by ≥ 10 %.
    assert figures["muon_torch_bf16_rel_err"] < 0.1
    assert figures["muon_vs_torch_rel_update_diff"] <= 2 * figures["muon_torch_bf16_rel_err"]


def test_galore(figures):
    # the same float32 operations in the same order as galore_torch: equal to rounding
    assert figures["galore_vs_reference_max_abs_diff"] <= 1e-6
    assert figures["galore_state_bytes"] == figures["galore_state_formula"]
    assert figures["adamw_state_bytes"] == figures["adamw_state_formula"]
    assert 0 < figures["galore_optimizer_state_ratio_vs_adamw"] < 1


def test_lisa(figures):
    assert figures["lisa_state_bytes"] == figures["lisa_state_formula"]
    assert 0 < figures["lisa_optimizer_state_ratio_vs_adamw"] < 0.5  # 1 of 4 blocks + embeddings/head
    assert figures["lora_ft_optimizer_state_ratio_vs_adamw"] < figures["lisa_optimizer_state_ratio_vs_adamw"]
    # every method learns the new chain (the base model starts near ln 64 ≈ 4.2 on it or worse)
    for m in ("full", "lora", "lisa"):
        assert figures[f"ft_{m}_final_max"] < 4.0


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("12_optimizers_and_stability"))
