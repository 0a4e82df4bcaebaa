import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet


@pytest.mark.notebook
def test_planning_notebook(run_nb):
    out = run_nb("10_planning_at_scale")
    f = out["figures"]
    # Published mixed-precision figures, exactly: 16 bytes per parameter.
    assert (f["mp_1b_gb"], f["mp_7b_gb"], f["mp_70b_gb"]) == (16, 112, 1120)
    assert f["zero_paper_stage1_gb"] == pytest.approx(31.4, abs=0.05)
    assert f["zero_paper_stage3_gb"] == pytest.approx(1.9, abs=0.05)
    # The cost model agrees with the bytes real ranks hold.
    assert f["measured_vs_model_max_rel_error"] < 0.01
    assert f["bubble_p4_m8"] == pytest.approx(3 / 11)
    # Plans: QLoRA needs fewer GPUs than full fine-tuning; full 70B needs > 1120/80 GPUs;
    # 70B QLoRA fits one 80 GB GPU (the QLoRA paper fit 65B on 48 GB).
    for size in ("7B", "70B", "405B"):
        assert 1 <= f[f"min_gpus_dpo_qlora_{size}"] <= f[f"min_gpus_dpo_full_{size}"]
    assert f["min_gpus_dpo_qlora_70B"] == 1
    assert f["min_gpus_dpo_full_70B"] >= 16
    assert f["min_gpus_dpo_full_405B"] > f["min_gpus_dpo_full_70B"]
    # Bigger models are slower per token on the same 1024 GPUs.
    for method in ("dpo_qlora", "dpo_full"):
        t = [f[f"tokens_per_s_{method}_{s}_1024gpus"] for s in ("7B", "70B", "405B")]
        assert t[0] > t[1] > t[2] > 0


@pytest.mark.notebook
def test_every_exercise_passes(run_nb):
    assert_every_check_passes(run_nb("10_planning_at_scale")["figures"])


@pytest.mark.notebook
def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("10_planning_at_scale"))
