"""FSDP with gradient accumulation: one reduce-scatter per backward, and they add up."""
import pytest

from tests._strict_ranks import strict_results

pytestmark = pytest.mark.distributed


def test_fsdp_accumulates_micro_batches():
    for r in strict_results():
        assert r["fsdp_accum_err"] < 1e-6
