import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet


@pytest.mark.notebook
def test_expert_parallel_notebook(run_nb):
    out = run_nb("09_expert_parallel")
    f = out["figures"]
    assert f["n_experts"] == 4 and f["top_k"] == 2 and f["ep_world_size"] == 2
    # Leaning tokens load the experts unevenly; the balancing loss sees it (1.0 = even).
    assert f["load_max_over_mean_leaning"] > 1.4 > f["load_max_over_mean_isotropic"]
    assert f["aux_loss_leaning"] > 1.1 and f["aux_loss_isotropic"] == pytest.approx(1.0, abs=0.05)
    # What capacity costs: drops at factor 1 when skewed, none at 4.
    assert f["dropped_cf1_leaning"] > 0.1 > f["dropped_cf1_isotropic"]
    assert f["dropped_cf2_leaning"] < f["dropped_cf1_leaning"] and f["dropped_cf4_leaning"] == 0
    # Same start, same batches: Switch's balancing loss evens the load that the task loss alone
    # leaves skewed, so capacity factor 1.0 drops far less, at no visible cost in task loss.
    assert f["train_alpha"] == 0.01
    assert f["lb_max_share_with"] < 0.3 < f["lb_max_share_without"]
    assert f["lb_dropped_cf1_with"] < 0.5 * f["lb_dropped_cf1_without"]
    assert f["lb_aux_with"] < 1.05 < f["lb_aux_without"]
    assert max(f["lb_task_loss_with"], f["lb_task_loss_without"]) < 0.1 * f["lb_task_loss_start"]
    assert f["lb_task_loss_with"] < 1.2 * f["lb_task_loss_without"]
    # The all-to-all bytes the layer counted equal T·k·d·4·(n-1)/n (per all-to-all, each way).
    T, k, d, n = 512 // 8, f["top_k"], 16, f["ep_world_size"]
    assert f["ep_a2a_measured_equals_formula"] is True
    assert f["ep_a2a_bytes_per_all_to_all_cf1"] == T * k * d * 4 * (n - 1) / n
    assert f["ep_a2a_forward_sent_cf2_over_cf1"] == 2
    # Expert parallel equals the single process, dropping the very same tokens.
    assert f["ep_max_abs_err"] < 1e-5 and f["ep_same_dropped_all_ranks"] is True
    assert f["ep_dropped_total"] > 0
    assert f["ep_all_to_all_forward"] == 2 and f["ep_all_to_all_backward"] == 2
    # 2 x 2 mesh training equals one process, and learns.
    assert f["mesh_loss_max_abs_err"] < 1e-5 and f["mesh_param_max_abs_err"] < 1e-4
    assert f["mesh_last_loss"] < f["mesh_first_loss"] - 0.5


@pytest.mark.notebook
def test_every_exercise_passes(run_nb):
    assert_every_check_passes(run_nb("09_expert_parallel")["figures"])


@pytest.mark.notebook
def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("09_expert_parallel"))
