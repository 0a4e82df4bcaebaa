import math

import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("01_rlhf_to_dpo")["figures"]


def test_loss_equals_trl(figures):
    assert figures["dpo_loss_vs_trl_max_abs_diff"] <= 1e-6
    assert figures["dpo_metrics_vs_trl_max_abs_diff"] <= 1e-5


def test_derivation_steps_hold_exactly(figures):
    assert figures["rlhf_optimum_value_err"] < 1e-12
    assert figures["rlhf_optimum_best_perturbation_gain"] < 0
    assert figures["reward_from_optimum_max_abs_err"] < 1e-12
    assert figures["bradley_terry_z_cancels_max_abs_err"] < 1e-12
    assert figures["dpo_optimum_vs_rlhf_optimum_max_abs_diff"] < 1e-5
    assert figures["implicit_reward_recovery_max_abs_err"] < 1e-5


def test_sampled_preferences_converge_like_inverse_sqrt(figures):
    assert -0.75 < figures["sampled_recovery_loglog_slope"] < -0.3
    assert figures["sampled_recovery_err_largest_n"] < figures["sampled_recovery_err_smallest_n"] / 3


def test_worked_example(figures):
    assert figures["worked_example_loss"] == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-9)
    assert figures["worked_example_margin"] == pytest.approx(2.0)
    assert figures["worked_example_grad_weight"] == pytest.approx(1 / (1 + math.exp(2)), abs=1e-6)


def test_averaging_is_summing_at_beta_over_length(figures):
    assert figures["mean_logps_equals_sum_at_beta_over_L_max_abs_diff"] < 1e-5


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("01_rlhf_to_dpo"))
