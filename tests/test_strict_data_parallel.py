"""DataParallel's buckets: a bucket that is exactly full is not split."""
import pytest

from tests._strict_ranks import strict_results

pytestmark = pytest.mark.distributed


def test_a_bucket_exactly_at_the_limit_stays_one_bucket():
    for r in strict_results():  # parameters [5, 2^17 − 10, 2^17, 10] floats, filled in reverse order
        assert r["dp_buckets"] == [[10, 2**17, 2**17 - 10], [5]]
