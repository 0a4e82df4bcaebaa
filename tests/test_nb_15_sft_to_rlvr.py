import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook

ARMS = ("sft", "dpo", "online_dpo", "grpo")


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("15_sft_to_rlvr")["figures"]


def test_the_three_losses(figures):
    # fp32 means of the same terms in another order: 1e-5; a shifted label or a wrong mask is off by > 0.1
    assert figures["losses_vs_transformers_max_abs_diff"] <= 1e-5
    # the SFT model never learnt the prompts (random operands): pre-training CE is dominated by them
    assert figures["prompt_token_ce"] > figures["pretrain_ce"] > figures["sft_ce"]


def test_reinforce_baselines(figures):
    assert figures["reinforce_wrong_weight_none"] == 0.0  # rewards in {0, 1}, b = 0: never pushed down
    assert figures["reinforce_wrong_weight_group"] < 0
    # no baseline and rewards shifted by +1: every sample pushes itself up (seen: 17x the variance)
    assert figures["reinforce_grad_var_offset"] > 2 * figures["reinforce_grad_var_none"]


def test_grpo_equals_trl_and_two_ranks_equal_one(figures):
    assert figures["grpo_vs_trl_cases"] == 168  # trl_check's sweep, new loss types included
    # fp32: the std's reduction order differs from TRL's (1e-7); a wrong formula is off by > 1e-3
    assert figures["grpo_loss_vs_trl_max_abs_diff"] <= 1e-5
    # tolerances of tests/test_grpo_train.py: only the order of the gradient sum differs
    assert figures["grpo_ws2_vs_ws1_max_abs_diff"] <= 1e-4
    assert figures["grpo_ws2_vs_ws1_metrics_max_abs_diff"] <= 1e-5


def test_grpo_training(figures):
    # seen 0.738 -> 0.838 on 80 held-out problems (8 problems more); a sign error in the advantage or
    # loss drives it down, lr too large drives it to ~0.1 (the lr x10 run)
    assert figures["grpo_test_success_after"] >= figures["grpo_test_success_before"] + 0.05
    assert figures["grpo_kl_last"] < 0.2  # β = 0.04 and lr 1e-4 keep it near the SFT model (seen 0.036)
    assert figures["fail_lr_x10_greedy"] < figures["fail_exact_greedy"] - 0.3


def test_zero_advantage_groups_fall_with_G(figures):
    shares = [figures[f"zero_advantage_share_G{g}"] for g in (2, 4, 8, 16)]
    # the first G of 16 samples: a group that is all-equal at G was all-equal at every smaller G
    assert shares == sorted(shares, reverse=True)
    assert shares[0] > shares[-1]


def test_equal_compute_comparison(figures):
    assert figures["seeds"] >= 2
    budget = figures["compute_grpo"]
    for arm in ("dpo", "online_dpo"):
        # whole steps: the DPO arms stop at the last step that fits (one step is < 5% of the budget)
        assert 0.9 * budget <= figures[f"compute_{arm}"] <= budget, arm
    for arm in ARMS:
        assert 0 <= figures[f"pass_at_1_{arm}"] <= figures[f"pass_at_8_{arm}"] <= 1, arm
        assert figures[f"task_success_{arm}_min"] <= figures[f"task_success_{arm}"] <= figures[f"task_success_{arm}_max"]
    assert figures["task_success_grpo"] > figures["task_success_sft"]  # seen 0.838 vs 0.738


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)



def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("15_sft_to_rlvr"))
