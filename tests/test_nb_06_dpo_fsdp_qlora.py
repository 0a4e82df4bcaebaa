"""Figures of notebooks/06_dpo_fsdp_qlora.ipynb (smoke profile: 2 CPU ranks, FSDP2 + QLoRA)."""
import math

import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def fig(run_nb):
    return run_nb("06_dpo_fsdp_qlora")["figures"]


def test_nf4_double_quant_bytes_per_param(fig):
    # 4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax (+ one offset per tensor)
    expected = (4 + 8 / 64 + 32 / (64 * 256)) / 8
    assert fig["base_bytes_per_param"] == pytest.approx(expected, abs=0.001)


def test_each_rank_holds_its_share(fig):
    assert fig["world_size"] == 2
    assert fig["rank0_base_param_fraction"] == pytest.approx(0.5, abs=0.01)
    assert fig["rank0_adapter_param_fraction"] == pytest.approx(0.5, abs=0.01)


def test_same_global_batch_on_1_and_2_ranks(fig):
    assert 0 <= fig["ws2_vs_ws1_loss_max_abs_diff"] < 1e-4


def test_resume_equals_uninterrupted(fig):
    assert 0 <= fig["resume_vs_uninterrupted_max_abs_diff"] <= 1e-6


def test_training_moves_the_right_way(fig):
    assert fig["loss_step1"] == pytest.approx(math.log(2), abs=1e-5)
    assert fig["loss_last_quarter"] < fig["loss_first_quarter"] - 0.02
    assert fig["margin_last_quarter"] > 0.2


def test_evaluation_moves_the_right_way(fig):
    assert fig["pref_accuracy_before"] == 0.5  # the reference ties every pair
    assert fig["pref_accuracy_after"] > 0.7
    assert fig["likelihood_accuracy_after"] > fig["likelihood_accuracy_before"] + 0.1
    assert fig["task_success_after"] > fig["task_success_before"] + 0.05


def test_every_exercise_passes(fig):
    assert_every_check_passes(fig)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("06_dpo_fsdp_qlora"))


def test_steps_1_and_2_log_the_reference(fig):
    # strict `>` as TRL: all-tied margins give 0.0, not 0.5; warm-up's first lr is 0, so step 2 is unchanged
    assert fig["accuracy_step1"] == 0.0
    assert fig["learning_rate_step1"] == 0.0
    assert fig["loss_step2"] == pytest.approx(math.log(2), abs=1e-7)
    assert fig["first_step_off_reference"] == 3
    assert fig["accuracy_first_step_off_reference"] > 0.5
    assert fig["learning_rate_max"] == pytest.approx(2e-3)  # the smoke profile's peak rate


def test_the_smoke_run_shows_a_reduced_beta_sweep(fig):
    """The lesson leads with the full profile's β sweep; the smoke run shows a reduced one."""
    assert fig["sweep_seeds"] >= 1 and fig["sweep_steps"] >= 1
    for beta in (0.05, 0.5):
        for key in ("pref_accuracy", "task_success"):
            lo, mid, hi = (fig[f"beta_{beta}_{key}{s}"] for s in ("_min", "", "_max"))
            assert 0.0 <= lo <= mid <= hi <= 1.0, (beta, key, lo, mid, hi)


def test_memory_pieces_chunked_logits_cut_the_peak(fig):
    # 2 pairs at a 151,936 vocabulary: the [tokens, V] fp32 logits and their log-softmax dominate
    assert 0 < fig["memory_chunked_vs_fp32_peak"] < 0.5


def test_memory_pieces_packing_and_no_reference_cut_the_peak(fig):
    assert fig["memory_padded_slots_per_real_token"] > 1.2  # uneven pairs: padding to remove
    assert 0 < fig["memory_packed_vs_padded_peak"] < 0.9
    assert 0 < fig["memory_no_reference_vs_fp32_peak"] < 0.95
