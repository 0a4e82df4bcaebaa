"""Interleaved 1F1B against Megatron-LM's warm-up count (get_forward_backward_func, interleaved:
num_warmup_microbatches = (p − r − 1)·2 + (v − 1)·p, capped at m·v)."""
import pytest

from dpo_lab.parallel.schedules import interleaved_1f1b, peak_in_flight


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 3), (3, 3, 2)])
def test_interleaved_warmup_is_megatrons(p, m, v):
    total = m * v
    for r, stage in enumerate(interleaved_1f1b(p, m, v)):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        first_b = next(i for i, a in enumerate(stage) if a.kind == "B")
        # warm-up forwards, then one more forward before the first backward if any is left
        assert first_b == warmup + (1 if warmup < total else 0), (r, stage)
    assert peak_in_flight(interleaved_1f1b(p, m, v)) == [
        min((p - r - 1) * 2 + (v - 1) * p + 1, total) for r in range(p)]
