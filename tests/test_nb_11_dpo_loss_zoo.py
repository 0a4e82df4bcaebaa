import pytest

from dpo_lab.dpo.loss import LOSS_TYPES
from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("11_dpo_loss_zoo")["figures"]


def test_every_loss_type_equals_trl(figures):
    assert figures["loss_zoo_types"] == len(LOSS_TYPES) == 15
    # fp32 sums: the SFT term's token mean reorders a reduction (1e-7); a wrong formula is off by > 1e-3
    assert figures["loss_zoo_vs_trl_max_abs_diff"] <= 1e-6


def test_loss_shapes(figures):
    beta = 0.1
    assert figures["sigmoid_weight_at_margin_0"] == pytest.approx(beta / 2, abs=1e-12)
    assert 0 < figures["sigmoid_weight_at_margin_40"] < 0.002  # fades, never stops
    assert abs(figures["hinge_zero_weight_from_margin"] - 1 / beta) <= 0.1 + 1e-9  # the grid's step
    assert figures["ipo_argmin_margin"] == pytest.approx(1 / (2 * beta), abs=1e-9)
    assert figures["sppo_hard_argmin_margin"] == pytest.approx(1 / beta, abs=1e-9)  # ±1/(2β) each
    assert figures["ipo_weight_at_margin_40"] == pytest.approx(-2 * (40 - 1 / (2 * beta)), abs=1e-9)
    assert figures["robust_weight_at_margin_40"] > 0.1 * beta / 0.8  # never below εβ/(1−2ε)


def test_the_runs_start_at_the_reference_and_cover_three_seeds(figures):
    assert figures["seeds"] >= 3 and figures["losses_trained"] >= 3
    assert figures["runs"] == figures["seeds"] * figures["losses_trained"]
    assert figures["step1_margin_max_abs"] == 0.0  # LoRA's B = 0: policy = reference
    assert figures["pref_accuracy_before"] == 0.5


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "nca_pair"])
def test_every_loss_learns_the_preference(figures, loss):
    assert figures[f"{loss}_pref_accuracy_min"] > 0.7  # the reference scores 0.5
    assert figures[f"{loss}_margin_last_step_mean"] > 0.1
    # the margin grows mostly by pushing the rejected answer down
    assert figures[f"{loss}_logratio_rejected_mean"] < -2 < figures[f"{loss}_logratio_chosen_mean"]
    assert figures[f"{loss}_task_success_mean"] > figures["task_success_before"]


def test_likelihood_displacement_is_common(figures):
    assert figures["chosen_drift_negative_runs"] >= figures["runs"] // 2


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("11_dpo_loss_zoo"))
