"""Notebook 14 (the memory wall). Timings come from a shared machine: they get loose sanity ranges
only; counts of FLOPs, bytes and saved activations get exact checks."""
import math

import pytest

from dpo_lab import exercises as ex
from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet
from tests.wrong_solutions import case_id, cases

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def figures(run_nb):
    return run_nb("14_memory_wall")["figures"]


def test_the_roofs_are_measured(figures):
    # any CPU of the last decade: 1 GFLOP/s to 100 TFLOP/s, 0.1 GB/s to 10 TB/s, even under load
    assert 1 < figures["roofline_peak_gflops"] < 1e5
    assert 0.1 < figures["roofline_bandwidth_gbps"] < 1e4
    ridge = figures["roofline_peak_gflops"] / figures["roofline_bandwidth_gbps"]
    assert figures["roofline_ridge_flops_per_byte"] == pytest.approx(ridge)
    assert 0.1 < ridge < 1000


def test_intensities_come_from_the_shapes(figures):
    # exact: fp32 counts from the shapes in roofline.ops_zoo
    assert figures["op_matmul_1024³_intensity"] == pytest.approx(1024 / 6)
    assert figures["op_add_intensity"] == pytest.approx(1 / 12)  # 1 FLOP per 3 × 4 bytes
    # a matrix–vector product: 2 FLOPs per 4-byte weight, plus the vectors
    assert 0.49 < figures["op_matvec_decode_intensity"] < 0.5
    assert 0.49 < figures["op_block_batch_1_intensity"] < 0.5
    # batching 64 tokens through the same weights: ~64× the intensity, less the activations' bytes
    assert 60 < figures["op_block_batch_64_intensity"] / figures["op_block_batch_1_intensity"] < 64
    assert figures["ops_measured"] == 13
    for key, value in figures.items():
        if key.endswith("_attained_fraction"):
            assert value > 0 and math.isfinite(value), key  # timings: no tighter claim survives a busy machine


def test_saved_activations_equal_the_formula(figures):
    assert figures["recompute_policies"] == 4 and figures["recompute_bytes_formula_exact"] == 1
    for p in ("none", "every", "every_k", "selective"):
        assert figures[f"recompute_{p}_saved_bytes"] == figures[f"recompute_{p}_formula_bytes"]
        assert figures[f"recompute_{p}_time_ratio"] > 0
    assert (figures["recompute_every_saved_bytes"] < figures["recompute_every_k_saved_bytes"]
            < figures["recompute_none_saved_bytes"])
    assert figures["recompute_selective_saved_bytes"] < figures["recompute_none_saved_bytes"]


def test_offload(figures):
    # two staging buffers of the largest chunk out of ~8 equal chunks: 2/8 of the state, plus rounding
    assert figures["offload_chunks"] >= 8
    assert 2 / figures["offload_chunks"] <= figures["offload_resident_bytes_ratio"] < 2 / (figures["offload_chunks"] - 1)
    assert figures["offload_resident_bytes_ratio"] == figures["offload_resident_bytes_ratio_formula"]
    err = figures["nvme_offload_step_time_model_rel_err"]
    assert math.isfinite(err) and err >= 0  # load varies: the lesson quotes it as a range
    assert figures["offload_achieved_io_gbps"] > 0 and figures["file_read_gbps"] > 0
    assert figures["fsdp2_cpu_offload_same_params"] == 1 and figures["fsdp2_cpu_offload_state_on_cpu"] == 1


def test_every_exercise_passes(figures):
    assert_every_check_passes(figures)


@pytest.mark.parametrize("case", cases(("14",)), ids=case_id)
def test_a_wrong_solution_gets_its_diagnosis(case):
    id, diagnosis, fn = case
    result = ex.grade(ex.get(id), fn)
    assert result.status == "fail", f"{fn.__name__} passed exercise {id}'s check"
    assert diagnosis in result.message, result.message


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("14_memory_wall"))
