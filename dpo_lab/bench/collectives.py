"""All-reduce bandwidth: the backend's own (gloo on CPU, nccl on GPUs) against the hand-written ring.

    dpo-lab bench collectives [--quick]

Rows are (world size, message size, variant) with algbw and busbw as nccl-tests defines them; a
second table fits α and β of the ring model T = 2(n−1)α + 2(n−1)/n·S/β to each variant's times.
"""
from dpo_lab.bench import Table
from dpo_lab.parallel.collectives import bandwidths
from dpo_lab.parallel.cost import fit_alpha_beta, ring_all_reduce_time
from dpo_lab.parallel.demos import time_all_reduce
from dpo_lab.parallel.launch import launch, pick_backend

KiB, MiB = 1024, 1024**2
FULL_SIZES = [KiB * 2**i for i in range(17)]    # 1 KiB .. 64 MiB, every power of two
QUICK_SIZES = [KiB * 4**i for i in range(8)]    # 1 KiB .. 16 MiB, every power of four


def rows_from_times(times: dict, n: int) -> list[dict]:
    """Rows of (ranks, size, variant, ms, algbw, busbw) from time_all_reduce's {(variant, size): s}."""
    native, rows = pick_backend(n), []
    for (variant, size), sec in times.items():
        algbw, busbw = bandwidths("all_reduce", size, sec, n)
        rows.append({"ranks": n, "size_bytes": size, "variant": native if variant == "native" else variant,
                     "ms": sec * 1e3, "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9})
    return rows


def sweep(world_sizes, sizes, repeat: int = 5, budget_s: float = 1.0, timeout: float = 600) -> list[dict]:
    """Time the native and ring all-reduce at every size on each world size; one row per measurement."""
    rows = []
    for n in world_sizes:
        times = launch(time_all_reduce, n, args=(sizes, ("native", "ring"), repeat),
                       kwargs={"budget_s": budget_s}, timeout=timeout)[0]
        rows += rows_from_times(times, n)
    return rows


def fit_rows(rows: list[dict]) -> list[dict]:
    """α, β per (ranks, variant) and the worst relative error of the fitted model (n ≥ 2:
    on one rank an all-reduce sends nothing and the model has no terms)."""
    out = []
    for key in sorted({(r["ranks"], r["variant"]) for r in rows if r["ranks"] > 1}):
        sel = [r for r in rows if (r["ranks"], r["variant"]) == key]
        sizes, secs = [r["size_bytes"] for r in sel], [r["ms"] / 1e3 for r in sel]
        alpha, beta = fit_alpha_beta(sizes, secs, key[0])
        pred = [ring_all_reduce_time(s, key[0], alpha, beta) for s in sizes]
        worst = max(abs(p - t) / t for p, t in zip(pred, secs))
        out.append({"ranks": key[0], "variant": key[1], "alpha_us": alpha * 1e6,
                    "beta_GBps": beta / 1e9, "max_rel_error": worst})
    return out


def ratio_at(rows, ranks: int, size: int, column: str = "busbw_GBps") -> float:
    """ring / native at one (ranks, size); algbw on one rank, where busbw's factor is 0."""
    column = "algbw_GBps" if ranks == 1 else column
    sel = {r["variant"]: r[column] for r in rows if r["ranks"] == ranks and r["size_bytes"] == size}
    native = next(v for k, v in sel.items() if k != "ring")
    return sel["ring"] / native


def run(quick: bool = False):
    sizes = QUICK_SIZES if quick else FULL_SIZES
    rows = sweep((2, 4), sizes, repeat=3 if quick else 10, budget_s=0.3 if quick else 2.0)
    native = pick_backend(4)
    ratio = ratio_at(rows, 4, 16 * MiB)
    bw = Table("all-reduce bus bandwidth (nccl-tests definitions)", rows, metric="busbw_GBps",
               baseline=native, group_by=("ranks", "size_bytes"), higher_is_better=True,
               notes={"ring_vs_native_busbw_ratio_4ranks_16MiB": ratio})
    fits = fit_rows(rows)
    fit = Table("alpha-beta fit: T = 2(n-1)a + 2(n-1)/n S/b", fits, metric="beta_GBps",
                baseline=native, group_by=("ranks",), higher_is_better=True)
    return [bw, fit]
