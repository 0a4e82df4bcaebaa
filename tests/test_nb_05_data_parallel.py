import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet


@pytest.mark.notebook
def test_data_parallel_notebook(run_nb):
    out = run_nb("05_data_parallel")
    f = out["figures"]
    assert f["world_size"] == 4 and f["params"] > 1000
    # fp32 strategies equal one process on the whole batch (reordered sums, amplified by Adam).
    for key in ("ddp_vs_single", "torch_ddp_vs_single", "zero1_vs_single", "zero2_vs_single", "fsdp_vs_single"):
        assert f[f"{key}_max_abs_diff"] < 1e-4, key
    assert f["torch_ddp_vs_ours_max_abs_diff"] < 1e-4
    assert f["fsdp_vs_fsdp2_max_abs_diff"] < 1e-4
    # bf16 compute: close to, but measurably different from, fp32.
    assert 1e-5 < f["fsdp_bf16_vs_single_max_abs_diff"] < 0.1
    assert f["fsdp_bf16_bytes_vs_fp32"] == pytest.approx(0.5)
    # Memory counted from tensors follows the ZeRO formulas; FSDP holds 1/n of plain DP.
    assert f["zero_memory_formula_max_rel_error"] < 0.01
    assert f["fsdp_memory_saving_vs_dp"] == pytest.approx(4.0, rel=0.01)
    # Bytes sent per step: 2Ψ(n-1)/n for DP and ZeRO-2, 3Ψ(n-1)/n for ZeRO-3.
    for key in ("dp", "zero2", "fsdp"):
        assert f[f"{key}_bytes_ratio_to_theory"] == pytest.approx(1.0, rel=0.01), key
    assert f["fsdp_vs_dp_bytes"] == pytest.approx(1.5, rel=0.01)
    # The timeline: every all-reduce launched inside backward with overlap, none without (structure,
    # not durations: tests/test_timeline.py checks the order bucket by bucket).
    assert f["timeline_buckets"] >= 3
    assert f["timeline_overlap_launched_in_backward"] == 1.0
    assert f["timeline_after_backward_launched_in_backward"] == 0.0


@pytest.mark.notebook
def test_every_exercise_passes(run_nb):
    assert_every_check_passes(run_nb("05_data_parallel")["figures"])


@pytest.mark.notebook
def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("05_data_parallel"))
