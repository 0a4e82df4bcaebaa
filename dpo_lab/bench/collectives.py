"""All-reduce bandwidth: the backend's own (gloo on CPU, nccl on GPUs) against the hand-written
ring and recursive doubling.

    dpo-lab bench collectives [--quick]

Rows are (world size, message size, variant) with algbw and busbw as nccl-tests defines them (the
median repetition; ms_min / ms_max the fastest and slowest); a second table fits α and β of the
ring model T = 2(n−1)α + 2(n−1)/n·S/β to every repetition of the native and ring variants, with
standard errors.
"""
import math
import os
import statistics

import numpy as np

from dpo_lab.bench import Table
from dpo_lab.parallel.collectives import bandwidths
from dpo_lab.parallel.cost import ring_all_reduce_time
from dpo_lab.parallel.demos import time_all_reduce
from dpo_lab.parallel.launch import launch, pick_backend

KiB, MiB = 1024, 1024**2
FULL_SIZES = [KiB * 2**i for i in range(17)]    # 1 KiB .. 64 MiB, every power of two
QUICK_SIZES = [KiB * 4**i for i in range(8)]    # 1 KiB .. 16 MiB, every power of four


def rows_from_times(times: dict, n: int) -> list[dict]:
    """Rows of (ranks, size, variant, ms, algbw, busbw, samples) from time_all_reduce's
    {(variant, size): seconds, or a list of every repetition's seconds}; ms is the median."""
    native, rows = pick_backend(n), []
    for (variant, size), sec in times.items():
        samples = sorted(sec) if isinstance(sec, (list, tuple)) else [sec]
        med = statistics.median(samples)
        algbw, busbw = bandwidths("all_reduce", size, med, n)
        rows.append({"ranks": n, "size_bytes": size, "variant": native if variant == "native" else variant,
                     "ms": med * 1e3, "ms_min": samples[0] * 1e3, "ms_max": samples[-1] * 1e3,
                     "repeats": len(samples), "samples_ms": [t * 1e3 for t in samples],
                     "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9})
    return rows


VARIANTS = ("native", "ring", "doubling")


def sweep(world_sizes, sizes, repeat: int = 5, budget_s: float = 1.0, timeout: float = 600,
          variants=VARIANTS) -> list[dict]:
    """Time the all-reduce variants at every size on each world size; one row per (size, variant)."""
    rows = []
    for n in world_sizes:
        times = launch(time_all_reduce, n, args=(sizes, variants, repeat),
                       kwargs={"budget_s": budget_s, "samples": True}, timeout=timeout)[0]
        rows += rows_from_times(times, n)
    return rows


def fit_with_errors(sizes_bytes, seconds, n: int) -> dict:
    """α, β of the ring model T = 2(n−1)α + 2(n−1)/n·S/β, fitted to (size, time) points (every
    repetition a point), with standard errors.

    T is a straight line a + b·S (a = 2(n−1)α, b = 2(n−1)/(nβ)); numpy's weighted polyfit with
    weights 1/T minimises relative errors (1 KiB and 16 MiB count alike, as cost.fit_alpha_beta)
    and, with cov=True, returns the covariance of (b, a) scaled by the residuals: the standard
    errors say how far α and β could move given the scatter of these points around the line."""
    S, t = np.asarray(sizes_bytes, float), np.asarray(seconds, float)
    if len(S) != len(t) or len(set(S.tolist())) < 2 or len(S) < 4:
        raise ValueError(f"need >= 4 (size, time) points over >= 2 sizes, got {len(S)} points, "
                         f"{len(t)} times, sizes {sorted(set(S.tolist()))}")
    (b, a), cov = np.polyfit(S, t, 1, w=1 / t, cov=True)
    steps, per_byte = 2 * (n - 1), 2 * (n - 1) / n
    alpha, beta = a / steps, per_byte / b
    rel = (t - (a + b * S)) / (a + b * S)
    return {"alpha_s": float(alpha), "alpha_se_s": float(math.sqrt(cov[1, 1]) / steps),
            "beta_Bps": float(beta), "beta_se_Bps": float(beta * math.sqrt(cov[0, 0]) / abs(b)),
            "points": len(S), "rel_residuals": rel.tolist()}


def fit_rows(rows: list[dict], variants=None) -> list[dict]:
    """α ± se, β ± se per (ranks, variant), fitted to every repetition, and the worst relative
    error of the fitted model at a size's median (n ≥ 2: on one rank an all-reduce sends nothing
    and the model has no terms). `variants`: those the ring model describes (default: all but
    the recursive doubling, which has its own model)."""
    out = []
    for key in sorted({(r["ranks"], r["variant"]) for r in rows if r["ranks"] > 1}):
        if (variants is None and key[1] == "doubling") or (variants is not None and key[1] not in variants):
            continue
        sel = [r for r in rows if (r["ranks"], r["variant"]) == key]
        sizes = [r["size_bytes"] for r in sel for _ in r.get("samples_ms", [r["ms"]])]
        secs = [t / 1e3 for r in sel for t in r.get("samples_ms", [r["ms"]])]
        fit = fit_with_errors(sizes, secs, key[0])
        pred = [ring_all_reduce_time(r["size_bytes"], key[0], fit["alpha_s"], fit["beta_Bps"]) for r in sel]
        worst = max(abs(p - r["ms"] / 1e3) / (r["ms"] / 1e3) for p, r in zip(pred, sel))
        out.append({"ranks": key[0], "variant": key[1], "alpha_us": fit["alpha_s"] * 1e6,
                    "alpha_se_us": fit["alpha_se_s"] * 1e6, "beta_GBps": fit["beta_Bps"] / 1e9,
                    "beta_se_GBps": fit["beta_se_Bps"] / 1e9, "points": fit["points"],
                    "max_rel_error": worst})
    return out


def ratio_at(rows, ranks: int, size: int, column: str = "busbw_GBps", variant: str = "ring") -> float:
    """variant / native at one (ranks, size); algbw on one rank, where busbw's factor is 0."""
    column = "algbw_GBps" if ranks == 1 else column
    sel = {r["variant"]: r[column] for r in rows if r["ranks"] == ranks and r["size_bytes"] == size}
    return sel[variant] / sel[pick_backend(ranks)]


def run(quick: bool = False):
    sizes = QUICK_SIZES if quick else FULL_SIZES
    load_before = os.getloadavg()[0]  # the machine's load: a shared box's timings need it
    rows = sweep((2, 4), sizes, repeat=5 if quick else 10, budget_s=0.3 if quick else 2.0)
    native = pick_backend(4)
    notes = {f"ring_vs_native_busbw_ratio_{n}ranks_16MiB": ratio_at(rows, n, 16 * MiB) for n in (2, 4)}
    # busbw ratios to native are time ratios upside down: t_doubling / t_ring = ring ratio / doubling ratio
    notes.update({f"doubling_over_ring_time_{n}ranks_1KiB": ratio_at(rows, n, KiB) /
                  ratio_at(rows, n, KiB, variant="doubling") for n in (2, 4)})
    notes["load_avg_1min_before_after"] = (load_before, os.getloadavg()[0])
    for k, v in notes.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v[0]:.2f}, {v[1]:.2f}")
    table_rows = [{k: v for k, v in r.items() if k != "samples_ms"} for r in rows]
    bw = Table("all-reduce bus bandwidth (nccl-tests definitions)", table_rows, metric="busbw_GBps",
               baseline=native, group_by=("ranks", "size_bytes"), higher_is_better=True, notes=notes)
    fits = fit_rows(rows)
    fit = Table("alpha-beta fit: T = 2(n-1)a + 2(n-1)/n S/b (every repetition; se = standard error)",
                fits, metric="beta_GBps", baseline=native, group_by=("ranks",), higher_is_better=True)
    return [bw, fit]
