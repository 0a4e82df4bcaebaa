import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook

ARMS = ["random", "easy_to_hard", "length_warmup"]


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("13_curriculum")["figures"]


def test_the_figures_the_issue_asks_for(figures):
    for arm in ARMS:
        assert 0 <= figures[f"curriculum_success_{arm}"] <= 1
    assert figures["curriculum_seeds"] >= 3  # 3 fit in the smoke profile


def test_every_arm_gets_the_same_token_budget(figures):
    steps, budget, longest = (figures[k] for k in ("curriculum_steps", "curriculum_tokens_per_batch",
                                                    "curriculum_max_length"))
    for arm in ARMS:
        # a batch stops only when the next row would not fit: full to within one row, every step
        assert steps * (budget - longest) < figures[f"curriculum_tokens_{arm}_min"]
        assert figures[f"curriculum_tokens_{arm}_max"] <= steps * budget


def test_the_curricula_start_where_they_say(figures):
    assert figures["curriculum_first_batch_easy_to_hard_max_carries"] == 0
    assert figures["curriculum_first_batch_random_max_carries"] == 2  # 64 draws: some need 2 carries
    assert figures["curriculum_first_batch_length_warmup_max_length"] == figures["curriculum_min_length"]
    assert figures["curriculum_first_batch_random_max_length"] == figures["curriculum_max_length"]


def test_every_arm_learns_from_scratch(figures):
    for arm in ARMS:
        # an untrained model writes no correct sum (1 in 200 by luck at most); every seed of every arm
        # ends above 0.1 (the smoke run's slowest seed: 0.115, length warm-up)
        assert figures[f"curriculum_start_success_{arm}_max"] <= 0.005
        assert figures[f"curriculum_success_{arm}_min"] > 0.1


def test_what_the_lesson_concludes(figures):
    f = figures
    # early on, every easy-to-hard seed is ahead of every random-order seed (0.20 against 0.025 at most)
    assert f["curriculum_quarter_success_easy_to_hard_min"] > f["curriculum_quarter_success_random_max"] + 0.1
    # at the end of the budget: easy-to-hard ahead of random order, the length warm-up behind it, on the means
    assert (f["curriculum_success_easy_to_hard"] > f["curriculum_success_random"]
            > f["curriculum_success_length_warmup"])


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("13_curriculum"))
