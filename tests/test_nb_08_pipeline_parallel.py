import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet


@pytest.mark.notebook
def test_pipeline_parallel_notebook(run_nb):
    out = run_nb("08_pipeline_parallel")
    f = out["figures"]
    assert f["stages"] == 4
    # The plan, simulated with uniform compute and free communication, is the formula exactly.
    assert f["planned_bubble_max_abs_err"] < 1e-9
    # The split model equals the unsplit one under every schedule.
    assert f["pipeline_grad_max_abs_err"] < 1e-5 and f["pipeline_loss_max_abs_err"] < 1e-5
    # Bubbles: (p-1)/(m+p-1) = 3/11 for m=8, 3/19 interleaved with v=2. What ran, in the order it
    # ran, replayed with nominal durations, is the formula exactly; no action started before its
    # inputs were done. The wall-clock bubbles depend on the machine's load: only reported.
    assert f["bubble_gpipe_m8_v1_formula"] == pytest.approx(3 / 11)
    assert f["bubble_interleaved_m8_v2_formula"] == pytest.approx(3 / 19)
    assert f["pipeline_bubble_replayed_max_abs_err_vs_formula"] < 1e-9
    assert f["pipeline_dependency_violations"] == 0
    for key in ("gpipe_m8_v1", "1f1b_m4_v1", "1f1b_m8_v1", "interleaved_m8_v2"):
        assert f[f"bubble_{key}_replayed"] == pytest.approx(f[f"bubble_{key}_formula"], abs=1e-9), key
        assert 0 < f[f"bubble_{key}_measured"] < 1, key
    assert f["bubble_interleaved_m8_v2_replayed"] < f["bubble_1f1b_m8_v1_replayed"]
    # In-flight micro-batches: m for GPipe, at most p for 1F1B.
    assert f["peak_in_flight_gpipe_m8_v1_max"] == 8
    assert f["peak_in_flight_1f1b_m8_v1_max"] == 4


@pytest.mark.notebook
def test_every_exercise_passes(run_nb):
    assert_every_check_passes(run_nb("08_pipeline_parallel")["figures"])


@pytest.mark.notebook
def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("08_pipeline_parallel"))
