import json

import pytest

from dpo_lab.paths import REPO_ROOT
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
    # The output layer's count agrees with the bytes torch allocated (the log-softmax covers T−1 of T = 64
    # positions: 1/64 short), and fused attention stores less than eager.
    assert f["logits_measured_mb"] == pytest.approx(f["logits_model_mb"], rel=1.01 / 64)
    assert f["activations_7b_pair_sdpa_gb"] < f["activations_7b_pair_gb"]
    # Lesson 06's CPU MFU: its tokens/s (results file) × 6N over the stated peak, far below the assumed 0.4.
    results = json.loads((REPO_ROOT / "results" / "06_dpo_fsdp_qlora.json").read_text())
    assert f["cpu_06_tokens_per_s"] == results["figures"]["tokens_per_s"]
    assert f["cpu_06_mfu"] == pytest.approx(6 * f["tiny_06_params"] * f["cpu_06_tokens_per_s"] / (2 * 32 * 2.6e9))
    assert 0 < f["cpu_06_mfu"] < 0.1
    # Step time scales almost as 1/MFU: slower at 6.9% than at 40%, but less than 0.4/0.069 (communication).
    for key in [k for k in f if k.startswith("slowdown_at_h100_06_mfu_")]:
        assert 1 < f[key] < 0.4 / 0.069
    # Runner-ups are ranked fastest first, and hiding communication never makes the winner slower.
    for case in ("dpo_full_70B_64gpus", "dpo_full_7B_1024gpus"):
        for o in ("0.0", "0.5", "1.0"):
            times = [f[f"top{i}_step_s_{case}_overlap{o}"] for i in range(1, 6)]
            assert times == sorted(times)
        assert (f[f"top1_step_s_{case}_overlap1.0"] <= f[f"top1_step_s_{case}_overlap0.5"]
                <= f[f"top1_step_s_{case}_overlap0.0"])
    assert f["top1_dpo_full_7B_1024gpus_overlap0.0"] == f["plan_dpo_full_7B_1024gpus"]


@pytest.mark.notebook
def test_every_exercise_passes(run_nb):
    assert_every_check_passes(run_nb("10_planning_at_scale")["figures"])


@pytest.mark.notebook
def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("10_planning_at_scale"))
