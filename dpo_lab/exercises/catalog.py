"""The workbook's exercises at a glance: which notebook grades which, and which have wrong-solution tests.

Exercises are counted from the notebooks' check cells (`check("NN.k", fn)`); wrong-solution tests
from `tests/wrong_solutions/*.py`, where each realistic mistake is a function decorated
`@wrong("NN.k", "the diagnosis it must get")` (read with `ast`, so nothing there is imported or run).
"""
import ast
import json

from dpo_lab.exercises import get
from dpo_lab.exercises.student import checked_exercises
from dpo_lab.paths import NOTEBOOK_DIR, REPO_ROOT

WRONG_DIR = REPO_ROOT / "tests" / "wrong_solutions"


def wrong_solution_ids() -> dict[str, int]:
    """{exercise id: number of wrong solutions fed to its grader by the tests}."""
    counts: dict[str, int] = {}
    for path in sorted(WRONG_DIR.glob("*.py")) if WRONG_DIR.exists() else []:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "wrong" and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    counts[dec.args[0].value] = counts.get(dec.args[0].value, 0) + 1
    return counts


def catalog() -> dict:
    wrong = wrong_solution_ids()
    rows = []
    for path in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")):
        for id in checked_exercises(json.loads(path.read_text(encoding="utf-8"))):
            rows.append({"id": id, "notebook": path.stem, "title": get(id).title,
                         "wrong_solution_tests": wrong.get(id, 0)})
    figures = {"exercises_total": len(rows),
               "exercises_with_wrong_solution_tests": sum(r["wrong_solution_tests"] > 0 for r in rows),
               "wrong_solution_tests": sum(r["wrong_solution_tests"] for r in rows)}
    for nb in sorted({r["notebook"] for r in rows}):
        figures[f"exercises_in_{nb}"] = sum(r["notebook"] == nb for r in rows)
    return {"exercises": rows, "figures": figures}
