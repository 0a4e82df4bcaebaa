"""The learning-rate sweep of lesson 02: the largest peak learning rate at which a run still trains."""
import math

import pytest

from dpo_lab.arch import norm_placement as npl
from dpo_lab.arch.toy_tasks import MarkovTask

GRID = (0.003, 0.1, 0.01, 0.03)  # deliberately unsorted


def test_largest_trained_lr_scans_down_and_stops_at_the_first_that_trains():
    calls = []

    def outcome_at(lr):
        calls.append(lr)
        return "trained" if lr <= 0.01 else "stalled"
    largest, tried = npl.largest_trained_lr(outcome_at, GRID)
    assert largest == 0.01
    assert calls == [0.1, 0.03, 0.01]  # 0.003 is not needed for the answer, so not run
    assert tried == {0.1: "stalled", 0.03: "stalled", 0.01: "trained"}


def test_largest_trained_lr_diverged_is_not_trained_and_none_when_nothing_trains():
    largest, tried = npl.largest_trained_lr(lambda lr: "diverged" if lr > 0.01 else "stalled", GRID)
    assert largest is None and sorted(tried) == sorted(GRID)
    # a rate that trains above a stalled one counts: the answer is the largest, not a threshold
    assert npl.largest_trained_lr(lambda lr: "trained" if lr in (0.003, 0.03) else "stalled", GRID)[0] == 0.03


def test_largest_trained_lr_names_an_empty_grid():
    with pytest.raises(ValueError, match="empty grid"):
        npl.largest_trained_lr(lambda lr: "trained", [])


def test_run_names_a_bad_placement():
    with pytest.raises(ValueError, match="'middle'"):
        npl.run("middle", 2, "warmup", 2, 1e-3, 1, MarkovTask(16, 2, seed=0))


def test_lr_sweep_is_consistent_with_its_runs():
    task = MarkovTask(16, 2, seed=0)
    sweep = npl.lr_sweep(2, (1e-3, 3e-2, 3.0), seeds=(0, 1), steps=12, warmup=6, task=task,
                         dim=16, n_heads=2)
    assert set(sweep) == {(p, s) for p in ("pre", "post") for s in ("nowarmup", "warmup")}
    for (p, s), r in sweep.items():
        assert len(r["largest"]) == 2
        for seed, largest in zip((0, 1), r["largest"]):
            outcomes = {lr: run["outcome"] for (sd, lr), run in r["runs"].items() if sd == seed}
            above = [o for lr, o in outcomes.items() if largest is None or lr > largest]
            assert all(o != "trained" for o in above), (p, s, seed, outcomes)
            if largest is not None:
                assert outcomes[largest] == "trained"
            assert all(math.isfinite(run["final_loss"]) for run in r["runs"].values())


def test_same_seed_same_run_different_seed_different_run():
    task = MarkovTask(16, 2, seed=0)
    a, b, c = (npl.run("post", 2, "warmup", 6, 1e-2, 3, task, seed=s, dim=16, n_heads=2)["losses"]
               for s in (0, 0, 1))
    assert a == b and a != c
