"""The graders: every realistic wrong solution gets its diagnosis, a stub is "not implemented yet",
nothing a student writes can hang or raise through a check, and the notebooks carry nbgrader's
markers so that their student versions can be generated."""
import json
import time

import pytest
import torch.distributed as dist

from dpo_lab import exercises as ex
from dpo_lab.exercises import catalog, student
from dpo_lab.workbook import list_notebooks, notebook_path
from tests.wrong_solutions import WRONG, case_id, cases

# The wrong solutions graded on ranks are in test_exercises_04_07.py and test_exercises_05_09_10.py,
# so that xdist runs them on other workers.
HERE = ("01", "02", "03", "06", "08", "11", "12", "13", "14", "15")


def _notebook(name):
    return json.loads(notebook_path(name).read_text(encoding="utf-8"))


def assert_diagnosed(id, diagnosis, fn):
    result = ex.grade(ex.get(id), fn)
    assert result.status == "fail", f"{fn.__name__} passed exercise {id}'s check"
    assert diagnosis in result.message, result.message


@pytest.mark.parametrize("case", cases(HERE), ids=case_id)
def test_a_wrong_solution_gets_its_diagnosis(case):
    assert_diagnosed(*case)


def _all_ids():
    return [e.id for nb in list_notebooks() for e in ex.exercises_of(nb[:2])]


@pytest.mark.parametrize("id", _all_ids())
def test_a_stub_is_not_implemented_yet(id):
    def stub(*args, **kwargs):
        raise NotImplementedError("not implemented yet")
    assert ex.grade(ex.get(id), stub).status == "todo"


def test_what_a_student_function_does_never_escapes_the_check():
    def raises(*a):
        raise ValueError("bad shape")
    res = ex.grade(ex.get("01.1"), raises)
    assert res.status == "fail" and "your function raised ValueError: bad shape" in res.message
    assert "in raises, line" in res.message  # the student's own line is named
    assert ex.grade(ex.get("01.1"), 42).message == "expected a function, got int"

    def spins(*a):
        while True:
            pass
    slow = ex.Exercise("99.1", "endless", lambda fn: fn(), timeout=1)
    t0 = time.monotonic()
    res = ex.grade(slow, spins)
    assert res.status == "fail" and "took longer than 1s" in res.message
    assert time.monotonic() - t0 < 10


def _rank_check(behaviour):
    def rank_fn(fn):
        if dist.get_rank() == 1:
            fn()
        return dist.get_rank()

    def check(fn):
        from dpo_lab.parallel import launch
        launch(rank_fn, 2, args=(fn,), timeout=15 if behaviour == "hang" else 60)
    return ex.Exercise("99.2", "on ranks", check, timeout=120)


def test_verdicts_from_ranks():
    def todo():
        raise NotImplementedError

    def wrong():
        raise ex.Wrong("rank 1 received its chunk one step late")

    def hangs():
        dist.barrier()  # rank 0 never joins
    assert ex.grade(_rank_check("todo"), todo).status == "todo"
    res = ex.grade(_rank_check("wrong"), wrong)
    assert res.status == "fail" and res.message == "rank 1 received its chunk one step late"

    def wrong_unnamed():
        raise ex.Wrong("the sum is 2× too large")
    assert ex.grade(_rank_check("wrong"), wrong_unnamed).message == "rank 1: the sum is 2× too large"
    res = ex.grade(_rank_check("hang"), hangs)
    assert res.status == "fail" and ("called on some ranks only" in res.message or "never finished" in res.message), res.message


def test_expect_close_names_a_constant_factor():
    import torch
    with pytest.raises(ex.Wrong, match=r"is 2× the expected value: divide by world_size"):
        ex.expect_close(torch.ones(3) * 2, torch.ones(3), "the sum", hints={2: "divide by world_size"})
    with pytest.raises(ex.Wrong, match=r"shape \(2,\), expected \(3,\)"):
        ex.expect_close(torch.ones(2), torch.ones(3), "x")
    ex.expect_close(torch.ones(3), torch.ones(3), "x")


# --- student versions -----------------------------------------------------------------------------

def test_strip_solutions_keeps_indentation_and_drops_hidden_tests():
    src = ("def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n"
           "### BEGIN HIDDEN TESTS\nassert f(1) == 2\n### END HIDDEN TESTS\ncheck('01.1', f)")
    assert student.strip_solutions(src) == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError(\"not implemented yet\")\ncheck('01.1', f)")
    for bad, says in [("### BEGIN SOLUTION\nx = 1", "never closed"), ("### END SOLUTION", "without"),
                      ("### BEGIN SOLUTION\n### BEGIN SOLUTION", "inside an open")]:
        with pytest.raises(student.MarkerError, match=says):
            student.strip_solutions(bad)


@pytest.mark.parametrize("name", list_notebooks())
def test_every_notebook_is_ready_for_nbgrader_and_grades_only_known_exercises(name):
    nb = _notebook(name)
    assert student.validate(nb, name) == []
    checked = student.checked_exercises(nb)
    registered = [e.id for e in ex.exercises_of(name[:2])]
    assert sorted(checked) == sorted(registered), "each registered exercise is checked once in its notebook"
    assert 2 <= len(registered) <= 4, f"{name}: {len(registered)} exercises (the workbook gives each notebook 2-4)"
    stub = student.student_version(nb, name)
    assert "### BEGIN SOLUTION" not in json.dumps(stub)
    assert all(not c.get("outputs") for c in stub["cells"] if c["cell_type"] == "code")


def test_student_command_and_exercise_figures(tmp_path, capsys):
    from dpo_lab.cli import main
    assert main(["student", "01_rlhf_to_dpo", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "01_rlhf_to_dpo.ipynb").exists()
    assert main(["student", "nope", "--out", str(tmp_path / "s")]) == 2
    capsys.readouterr()
    assert main(["exercises", "--json", "--out", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out)
    cat = catalog.catalog()
    assert figures == cat["figures"] == json.loads((tmp_path / "metrics" / "exercises.json").read_text())
    assert figures["exercises_total"] == sum(len(ex.exercises_of(n[:2])) for n in list_notebooks())
    everything = cases([n[:2] for n in list_notebooks()])
    assert figures["exercises_with_wrong_solution_tests"] == len({i for i, _, _ in everything})
    assert figures["wrong_solution_tests"] == len(everything) == len(WRONG)
    assert figures["exercises_total"] >= 25 and figures["exercises_with_wrong_solution_tests"] == figures["exercises_total"]
