"""The spike detector on synthetic series and the cures of the spike runner doing what they say."""
import math
import statistics

import pytest
import torch

from dpo_lab.optim.spikes import RunConfig, count_spikes, make_optimizer, spike_steps, train_run

SMALL = RunConfig(steps=24, lr=3e-2, dim=16, n_layers=1, n_heads=2, batch_size=8, seq_len=16)


def test_detector_finds_planted_spikes_only():
    g = torch.Generator().manual_seed(0)
    flat = (2.0 + 0.05 * torch.randn(60, generator=g)).tolist()
    flat[20] *= 2.0
    flat[40] = flat[41] = 5.0  # two consecutive steps: one event
    flat[50] *= 1.4            # below the factor 1.5: not a spike
    assert spike_steps(flat, window=10, factor=1.5) == [20, 40, 41]
    assert count_spikes(flat, window=10, factor=1.5) == 2


def test_detector_quiet_on_a_smooth_decreasing_curve_and_counts_nan():
    smooth = [4.0 * math.exp(-t / 15) + 1.0 for t in range(80)]
    assert spike_steps(smooth) == []
    assert spike_steps(smooth[:30] + [math.nan] + smooth[30:]) == [30]


def test_detector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="factor=1"):
        spike_steps([1.0] * 5, window=10, factor=1.0)


def test_runs_are_seeded():
    a, b, c = train_run(SMALL, 0), train_run(SMALL, 0), train_run(SMALL, 1)
    assert a["loss"] == b["loss"] and a["update_norm"] == b["update_norm"]
    assert a["loss"] != c["loss"]


def test_clipping_bounds_the_applied_gradient_norm():
    tr = train_run(SMALL.but(clip=0.3, bad_batches=(12, 13)), 0)
    assert max(tr["grad_norm"]) > 0.3  # else the bound would hold without clipping
    assert all(a <= 0.3 * (1 + 1e-5) for a in tr["applied_grad_norm"])
    assert all(a == pytest.approx(min(g, 0.3), rel=1e-4) for g, a in zip(tr["grad_norm"], tr["applied_grad_norm"]))


def test_warmup_ramps_the_learning_rate():
    tr = train_run(SMALL.but(warmup=8), 0)
    assert tr["lr"][:8] == pytest.approx([3e-2 * (t + 1) / 8 for t in range(8)])
    assert tr["lr"][8:] == pytest.approx([3e-2] * (SMALL.steps - 8))


def test_optimizer_gets_the_hyper_parameters():
    cfg = SMALL.but(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6, lr=1e-3)
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"], group["lr"]) == (0.1, (0.9, 0.95), 1e-6, 1e-3)


def test_weight_decay_shrinks_the_weights():
    # same data and init; decoupled decay pulls every step's weights toward 0 by lr·λ·θ
    free, decayed = train_run(SMALL, 0), train_run(SMALL.but(weight_decay=1.0), 0)
    assert decayed["update_norm"][0] > free["update_norm"][0]


def test_skip_batch_skips_exactly_the_outliers():
    cfg = SMALL.but(skip_factor=2.0, bad_batches=(14, 15, 16))
    tr = train_run(cfg, 0)
    assert any(tr["skipped"])
    for t, skipped in enumerate(tr["skipped"]):
        prev = tr["loss"][max(0, t - 10):t]  # the rule written out again: median of the last 10
        want = len(prev) >= 3 and tr["loss"][t] > 2.0 * statistics.median(prev)
        assert skipped == want, t
        assert (tr["update_norm"][t] == 0.0) == skipped, t  # a skipped step changes nothing


def test_bad_batches_damage_the_model_and_skipping_prevents_it():
    burst = SMALL.but(steps=30, bad_batches=(16, 17, 18, 19))
    hurt, saved = train_run(burst, 0), train_run(burst.but(skip_factor=2.0), 0)
    # the clean-batch loss rises by > 20 % after the burst unless the bad batches are skipped
    assert max(hurt["clean_loss"][17:]) > 1.2 * hurt["clean_loss"][16]
    assert max(saved["clean_loss"][17:]) < 1.02 * saved["clean_loss"][16]


def test_detector_uses_a_running_window():
    # after a drop, the median of the last 10 (1.0) flags 2.5; the median of all history (2.5) would not
    series = [4.0] * 20 + [1.0] * 20 + [2.5]
    assert spike_steps(series, window=10, factor=1.5) == [40]
