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


def test_closed_form_gradient_matches_autograd(figures):
    # float32 log-probs (sequence_logps computes in float32): a wrong sign or σ(u) for σ(−u) is off by > 0.01
    assert figures["grad_logps_vs_autograd_max_abs_diff"] < 1e-6
    assert figures["grad_logits_vs_autograd_max_abs_diff"] < 1e-6


def test_conservative_dpo_stops_at_log_odds_and_robust_dpo_never_stops(figures):
    assert figures["cdpo_argmin_margin"] == pytest.approx(math.log(0.9 / 0.1), abs=1e-3)
    assert figures["cdpo_optimal_margin_closed_form"] == pytest.approx(math.log(9), abs=1e-12)
    assert figures["robust_loss_at_margin_8"] < -0.9  # the plot shows it below 0
    assert figures["robust_loss_slope_at_large_margin"] == pytest.approx(-0.1 / 0.8, abs=1e-6)


def test_likelihood_displacement_and_dpop(figures):
    assert figures["displacement_margin_after"] > 3
    assert figures["displacement_chosen_logp_change"] < -3
    assert figures["displacement_unwanted_prob_after"] > 0.9 > 0.2 > figures["displacement_unwanted_prob_before"]
    assert figures["dpop_chosen_prob_after"] >= figures["displacement_chosen_prob_before"]


def test_summed_and_averaged_margins_disagree_at_realistic_lengths(figures):
    assert figures["length_sign_disagreement_fraction"] > 0.1
    assert figures["length_sum_margin_corr_with_length_diff"] < -0.7
    assert abs(figures["length_mean_margin_corr_with_length_diff"]) < 0.15
    assert figures["length_example_sum_margin"] < 0 < figures["length_example_mean_margin"]
    assert figures["length_median_abs_u_sum"] > 100 * figures["length_median_abs_u_mean"]


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("01_rlhf_to_dpo"))
