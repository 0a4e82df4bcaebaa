"""The DPO memory planner against measured steps of our trainer in full fine-tuning
(train.finetune=full, 1 and 2 ranks, cached reference). A file of its own so that it runs beside
tests/test_memory_planner.py's LoRA configurations (pytest-xdist distributes by file)."""
import pytest

from dpo_lab.memory import planner
from tests.test_memory_planner import TOTAL_TOLERANCE

FULL = [c for c in planner.MEASURED if "train.finetune=full" in c[2]]


@pytest.mark.distributed
def test_full_finetune_prediction_against_measured_steps():
    assert [n for n, _, _ in FULL] == ["1 rank, full fine-tuning", "2 ranks, full fine-tuning"]
    rows = planner.check_against_measured(FULL)
    for r in rows:
        m, t = r["measured_terms"], r["terms"]
        assert t["reference"] == 0  # the cached reference holds no weights
        # every parameter trainable: held as `adapters` (trainable) on both sides, to the byte;
        # only the rope buffers are not trained
        assert (t["base_weights"], t["adapters"], t["optimizer"]) == (m["weights"], m["adapters"], m["optimizer"]), r["name"]
        assert abs(r["rel_err"]) <= TOTAL_TOLERANCE, (r["name"], round(r["rel_err"], 3))
