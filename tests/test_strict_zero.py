"""ZeRO-2 with gradient accumulation: the reduce-scattered pieces of every micro-batch add up."""
import pytest

from tests._strict_ranks import strict_results

pytestmark = pytest.mark.distributed


def test_zero2_accumulates_micro_batches():
    for r in strict_results():
        assert r["zero2_accum_err"] < 1e-6
