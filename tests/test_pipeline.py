"""The pipeline executor on real ranks equals the unsplit model; its events show the bubble.

Wall-clock bubbles depend on the machine's load, so they are only reported; what is asserted is
the bubble of the executed order with nominal durations, and that no action started before what
it depends on had ended."""
import random

import pytest
import torch

from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.parallel import launch
from dpo_lab.parallel.pipeline import (bubble_from_events, bubble_replayed, dependency_violations,
                                       gather_runs, pipeline_rank, split_model)
from dpo_lab.parallel.schedules import Action, bubble_formula, make_schedule, simulate


def test_split_model_chunks_compose_to_the_model():
    torch.manual_seed(0)
    model = TinyTransformer(32, 16, 4, 2)
    tokens = torch.randint(0, 32, (2, 5))
    x = tokens
    for chunk in split_model(model, 4):
        x = chunk(x)
    torch.testing.assert_close(x, model(tokens))
    with pytest.raises(ValueError, match="evenly"):
        split_model(model, 3)


def test_bubble_from_events():
    # two stages, one micro-batch: F on 0 then 1, B on 1 then 0; F=1, B=2 -> each idle 3 of 6
    events = [(0, "F", 0, 0, 0, 1), (1, "F", 0, 0, 1, 2), (1, "B", 0, 0, 2, 4), (0, "B", 0, 0, 4, 6)]
    assert bubble_from_events(events, 2) == pytest.approx(0.5)


def _events(name, p, m, v, jitter=0.0, seed=0):
    """Events of a simulated run whose actions take 1 or 2 units plus up to `jitter` more and
    start up to `jitter` late (a loaded machine), in the schedule's order."""
    rng = random.Random(seed)
    timeline = simulate(make_schedule(name, p, m, v), 1.0, 2.0)
    return [(r, a.kind, a.microbatch, a.chunk, s + rng.uniform(0, jitter) + 3 * jitter * k,
             e + 3 * jitter * k + 2 * jitter)
            for r, stage in enumerate(timeline) for k, (a, s, e) in enumerate(stage)]


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 2, 4, 1), ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2)])
def test_replayed_bubble_is_the_formula_whatever_the_wall_clock(name, p, m, v):
    noisy = _events(name, p, m, v, jitter=0.7)
    assert bubble_from_events(noisy, p) != pytest.approx(bubble_formula(p, m, v), abs=1e-3)
    assert bubble_replayed(noisy, p) == pytest.approx(bubble_formula(p, m, v), abs=1e-12)


def test_replay_of_a_run_missing_an_action_raises():
    events = [e for e in _events("1f1b", 2, 4, 1) if (e[0], e[1], e[2]) != (1, "B", 2)]
    with pytest.raises(RuntimeError, match="deadlocks"):
        bubble_replayed(events, 2)


def test_dependency_violations():
    assert dependency_violations(_events("interleaved", 2, 4, 2), 2) == []
    # stage 1 starts micro-batch 0's forward before stage 0 has finished it
    events = [(0, "F", 0, 0, 0, 1), (1, "F", 0, 0, 0.5, 2), (1, "B", 0, 0, 2, 4), (0, "B", 0, 0, 4, 6)]
    (late, dep, overlap), = dependency_violations(events, 2)
    assert late == (1, Action("F", 0)) and dep == (0, Action("F", 0)) and overlap == 0.5


@pytest.fixture(scope="module")
def two_ranks():
    settings = [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved", 4, 2)]
    return gather_runs(launch(pipeline_rank, 2, args=(settings,), kwargs=dict(t_f=0.02), timeout=240))


@pytest.mark.distributed
def test_two_stage_schedules_equal_unsplit_model(two_ranks):
    for run in two_ranks:
        assert run["loss_err"] < 1e-5 and run["grad_err"] < 1e-5, run["schedule"]


@pytest.mark.distributed
def test_in_flight_activations_m_for_gpipe_p_for_1f1b(two_ranks):
    by = {r["schedule"]: r for r in two_ranks}
    assert by["gpipe"]["peak_in_flight"] == [4, 4]
    assert by["1f1b"]["peak_in_flight"] == [2, 1]


@pytest.mark.distributed
def test_executed_bubble_is_the_formula_and_order_respects_dependencies(two_ranks):
    for run in two_ranks:
        assert run["dependency_violations"] == 0, run["schedule"]
        assert run["bubble_replayed"] == pytest.approx(run["bubble_formula"], abs=1e-12), run["schedule"]
        assert 0 < run["bubble_measured"] < 1  # wall clock: depends on load, only reported


@pytest.mark.distributed
def test_four_stages_equal_unsplit_model():
    runs = gather_runs(launch(pipeline_rank, 4, args=([("1f1b", 4, 1), ("interleaved", 4, 2)],),
                              kwargs=dict(t_f=0.0), timeout=240))
    for run in runs:
        assert run["loss_err"] < 1e-5 and run["grad_err"] < 1e-5, run["schedule"]
        assert run["dependency_violations"] == 0, run["schedule"]
        assert run["bubble_replayed"] == pytest.approx(run["bubble_formula"], abs=1e-12), run["schedule"]
    assert runs[0]["peak_in_flight"] == [4, 3, 2, 1]



@pytest.mark.distributed
def test_every_schedule_trains_the_same_model(two_ranks):
    """Interleaving splits the same layers into v chunks per stage; it must not run a v× deeper model."""
    assert [r["n_layers"] for r in two_ranks] == [4, 4, 4]
