"""Figures of notebooks/02_normalization.ipynb (smoke profile)."""
import pytest

from tests._exercise_checks import assert_every_check_passes, assert_every_check_says_not_implemented_yet

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def fig(run_nb):
    return run_nb("02_normalization")["figures"]


@pytest.mark.parametrize("kind", ["batchnorm", "layernorm", "rmsnorm", "weightnorm"])
def test_each_norm_equals_its_torch_twin(fig, kind):
    assert 0 <= fig[f"max_abs_diff_vs_torch_{kind}"] <= 1e-5


def test_batchnorm_depends_on_the_batch(fig):
    assert fig["bn_spread_batch2"] > 3 * fig["bn_spread_batch64"] > 0
    assert fig["layernorm_spread_batch2"] == 0
    assert fig["bn_train_eval_gap_batch2"] > 3 * fig["bn_train_eval_gap_batch64"]
    assert fig["bn_batch1_output_minus_bias"] <= 1e-6


def test_invariances(fig):
    assert fig["layernorm_scale_invariance_max_diff"] < 1e-4
    assert fig["layernorm_shift_invariance_max_diff"] < 1e-4
    assert fig["rmsnorm_scale_invariance_max_diff"] < 1e-4
    assert fig["rmsnorm_shift_max_diff"] > 0.1


def test_gradients_at_init(fig):
    # pre-norm: each layer's gradient shrinks as the stack deepens; post-norm: it does not
    assert fig["prenorm_grad_last_layer_d48_over_d6"] < 0.7
    assert 0.7 < fig["postnorm_grad_last_layer_d48_over_d6"] < 1.5


def test_prenorm_trains_at_every_depth(fig):
    keys = [k for k in fig if k.startswith("prenorm_d") and k.endswith("_outcome")]
    assert len(keys) >= 4
    assert all(fig[k] == "trained" for k in keys)


def test_deepest_postnorm_needs_warmup(fig):
    depths = sorted(int(k.split("_")[1][1:]) for k in fig if k.startswith("postnorm_d") and k.endswith("_outcome"))
    deep = depths[-1]
    assert fig[f"postnorm_d{deep}_nowarmup_outcome"] in ("stalled", "diverged")
    assert fig[f"postnorm_d{deep}_warmup_outcome"] == "trained"
    assert fig[f"postnorm_d{deep}_nowarmup_final_loss"] > fig[f"prenorm_d{deep}_nowarmup_final_loss"] + 1.0
    assert fig[f"postnorm_d{depths[0]}_nowarmup_outcome"] == "trained"  # shallow stacks are fine


def _largest(fig, placement, schedule):
    keys = sorted(k for k in fig if k.startswith(f"lrsweep_{placement}norm_{schedule}_largest_lr_seed"))
    return [fig[k] for k in keys]


def test_lr_sweep_covers_three_seeds_and_every_case(fig):
    for p in ("pre", "post"):
        for s in ("nowarmup", "warmup"):
            assert len(_largest(fig, p, s)) >= 3, (p, s)


def test_lr_sweep_post_norm_needs_warmup_pre_norm_does_not(fig):
    pre, pre_w = _largest(fig, "pre", "nowarmup"), _largest(fig, "pre", "warmup")
    post, post_w = _largest(fig, "post", "nowarmup"), _largest(fig, "post", "warmup")
    # seed by seed, warm-up never lowers the largest trainable rate
    assert all(w >= n for w, n in zip(pre_w, pre)) and all(w >= n for w, n in zip(post_w, post))
    assert min(post_w) > max(post) > 0      # post-norm: warm-up raises it on every seed
    assert min(pre) >= max(post_w)          # pre-norm without warm-up tolerates what post-norm with it does
    assert min(pre) > max(post)


def test_timing_ratio_is_reported(fig):
    # Speed is compared in `dpo-lab bench norms`, not asserted here: timings drift with load.
    assert fig["scratch_rmsnorm_over_layernorm_time"] > 0


def test_every_exercise_passes(fig):
    assert_every_check_passes(fig)


def test_student_version_runs_and_every_check_says_not_implemented_yet(run_student_nb):
    assert_every_check_says_not_implemented_yet(run_student_nb("02_normalization"))
