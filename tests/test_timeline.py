"""The data-parallel timeline: with overlap every bucket's all-reduce starts inside backward, in
reverse layer order; without, after it. Structure only, never durations (the machine is shared)."""
import pytest
import torch

from dpo_lab.parallel import launch
from dpo_lab.parallel.dp_training import lm_loss, make_batches, make_model
from dpo_lab.parallel.timeline import dp_step_timeline, marks
from tests._timeline_ranks import profiled_step, synced_grads

pytestmark = pytest.mark.distributed
STEPS = 2


@pytest.fixture(scope="module")
def timeline():
    # TINY model, ~20 kB buckets: several buckets, each holding parameters of one or two layers
    return launch(dp_step_timeline, 2, kwargs=dict(steps=STEPS, bucket_mb=0.02, seq=16), timeout=240)


def every_step(out, mode):
    for s, ranks in enumerate(out["steps"][mode]):
        for r, events in enumerate(ranks):
            yield (mode, s, r), events, marks(events)


def test_rank_zero_gathers_every_rank_and_step(timeline):
    assert timeline[1] is None
    out = timeline[0]
    assert out["one_clock"]  # both ranks on this host: one time axis
    assert len(out["buckets"]) >= 4
    for mode in ("overlap", "after_backward"):
        assert len(out["steps"][mode]) == STEPS and all(len(ranks) == 2 for ranks in out["steps"][mode])


def test_each_bucket_is_ready_launched_and_completed_once_in_that_order(timeline):
    nb = len(timeline[0]["buckets"])
    for mode in ("overlap", "after_backward"):
        for where, events, m in every_step(timeline[0], mode):
            for kind in ("ready", "launch", "done"):
                assert sorted(b for k, b, _ in events if k == kind) == list(range(nb)), (where, kind)
            for b in range(nb):
                assert m["backward_start"] <= m[("ready", b)] <= m[("launch", b)] <= m[("done", b)], (where, b)
            # the main thread's events were appended in time order ("done" comes from another thread)
            main = [t for k, _, t in events if k != "done"]
            assert main == sorted(main), where
            assert m["forward_start"] <= m["backward_start"] <= m["backward_end"] <= m["sync_end"], where


def test_buckets_launch_in_bucket_order_which_is_reverse_layer_order(timeline):
    out = timeline[0]
    layers = out["bucket_layers"]
    assert max(layers[0]) == max(max(b) for b in layers)  # bucket 0 holds the top (the head)
    for a, b in zip(layers, layers[1:]):
        assert min(a) >= max(b), layers  # each bucket sits below the one before it
    for mode in ("overlap", "after_backward"):
        for where, events, m in every_step(out, mode):
            launches = [b for k, b, _ in events if k == "launch"]
            assert launches == list(range(len(layers))), where


def test_overlap_launches_every_bucket_before_backward_ends(timeline):
    for where, events, m in every_step(timeline[0], "overlap"):
        late = [b for k, b, t in events if k == "launch" and t >= m["backward_end"]]
        assert not late, f"{where}: buckets {late} launched after backward ended"


def test_without_overlap_every_launch_comes_after_backward(timeline):
    for where, events, m in every_step(timeline[0], "after_backward"):
        early = [b for k, b, t in events if k == "launch" and t <= m["backward_end"]]
        assert not early, f"{where}: buckets {early} launched before backward ended"


def test_torch_profiler_sees_the_same_structure():
    """The library's own recorder: all-reduce calls inside backward with overlap, after it without."""
    for overlap in (True, False):
        for r, p in enumerate(launch(profiled_step, 2, args=(overlap,), timeout=240)):
            assert len(p["allreduce"]) == p["buckets"], (overlap, r)
            backward_end = max(end for _, end in p["backward"])
            inside = [s for s, _ in p["allreduce"] if s < backward_end]
            assert len(inside) == (p["buckets"] if overlap else 0), (overlap, r, p)


def test_both_modes_give_the_single_process_gradient():
    torch.manual_seed(0)
    model = make_model(0)
    lm_loss(model, make_batches(1, 8, 16, 64, 0)[0]).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    got = {ov: launch(synced_grads, 2, args=(ov,), timeout=240) for ov in (True, False)}
    for ov, ranks in got.items():
        for grads in ranks:
            for n, g in grads.items():
                torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-6, msg=f"overlap={ov} {n}")
    for n in got[True][0]:  # the same buckets summed the same way: bit-identical
        assert torch.equal(got[True][0][n], got[False][0][n]), n
