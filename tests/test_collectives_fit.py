"""The α-β fit with standard errors, against cost.fit_alpha_beta (lstsq, written apart) and
against data with known α, β and known noise."""
import numpy as np
import pytest

from dpo_lab.bench.collectives import fit_rows, fit_with_errors
from dpo_lab.parallel.cost import fit_alpha_beta, ring_all_reduce_time

SIZES = [1024 * 4**i for i in range(7)]  # 1 KiB .. 4 MiB
ALPHA, BETA, N = 1e-3, 0.5e9, 4


def _noisy(seed: int, rel_noise: float, repeats: int = 5):
    g = np.random.default_rng(seed)
    sizes = [s for s in SIZES for _ in range(repeats)]
    times = [ring_all_reduce_time(s, N, ALPHA, BETA) * (1 + rel_noise * g.standard_normal()) for s in sizes]
    return sizes, times


def test_fit_equals_cost_fit_alpha_beta():
    sizes, times = _noisy(0, 0.1)
    fit = fit_with_errors(sizes, times, N)
    alpha, beta = fit_alpha_beta(sizes, times, N)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-9)
    assert fit["beta_Bps"] == pytest.approx(beta, rel=1e-9)


def test_exact_data_has_no_error():
    times = [ring_all_reduce_time(s, N, ALPHA, BETA) for s in SIZES]
    fit = fit_with_errors(SIZES, times, N)
    assert fit["alpha_s"] == pytest.approx(ALPHA, rel=1e-9) and fit["beta_Bps"] == pytest.approx(BETA, rel=1e-9)
    assert fit["alpha_se_s"] < 1e-9 * ALPHA and fit["beta_se_Bps"] < 1e-9 * BETA
    assert max(map(abs, fit["rel_residuals"])) < 1e-9


def test_standard_errors_match_the_spread_of_the_estimates():
    # A standard error is the standard deviation the estimate would have over repeated
    # experiments: run 300 seeded ones with 10% noise and compare.
    fits = [fit_with_errors(*_noisy(seed, 0.1), N) for seed in range(300)]
    for est, se in (("alpha_s", "alpha_se_s"), ("beta_Bps", "beta_se_Bps")):
        spread = np.std([f[est] for f in fits])
        mean_se = np.mean([f[se] for f in fits])
        assert 0.85 < mean_se / spread < 1.15, (est, mean_se, spread)
    # 4× the repeats: about half the standard error.
    few, many = fit_with_errors(*_noisy(1, 0.1, 5), N), fit_with_errors(*_noisy(1, 0.1, 20), N)
    assert 0.35 < many["alpha_se_s"] / few["alpha_se_s"] < 0.65


def test_fit_rows_uses_every_repetition_and_skips_doubling():
    rows = [{"ranks": N, "variant": v, "size_bytes": s, "ms": 1e3 * ring_all_reduce_time(s, N, ALPHA, BETA),
             "samples_ms": [1e3 * ring_all_reduce_time(s, N, ALPHA, BETA) * f for f in (0.9, 1.0, 1.1)]}
            for v in ("gloo", "ring", "doubling") for s in SIZES]
    fits = fit_rows(rows)
    assert [(f["ranks"], f["variant"]) for f in fits] == [(N, "gloo"), (N, "ring")]
    assert all(f["points"] == 3 * len(SIZES) for f in fits)
    assert fits[0]["alpha_us"] == pytest.approx(1e3, rel=0.05) and fits[0]["alpha_se_us"] > 0


def test_too_few_points_are_named():
    with pytest.raises(ValueError, match="got 3 points"):
        fit_with_errors([1, 2, 3], [1.0, 2.0, 3.0], 2)
