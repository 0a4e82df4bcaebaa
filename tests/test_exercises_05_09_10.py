"""Wrong solutions of notebooks 05, 09, 10, graded on real ranks, each given its diagnosis
(apart from tests/test_exercises.py so that xdist runs them on another worker)."""
import pytest

from tests.test_exercises import assert_diagnosed
from tests.wrong_solutions import case_id, cases


@pytest.mark.distributed
@pytest.mark.parametrize("case", cases(("05", "09", "10")), ids=case_id)
def test_a_wrong_solution_gets_its_diagnosis(case):
    assert_diagnosed(*case)
