"""The notebook contract, checked for every notebook and lesson."""
import json
import re

import pytest

from dpo_lab.paths import NOTEBOOK_DIR, REPO_ROOT
from dpo_lab.workbook import lesson_path, list_notebooks, parameters_cell

NOTEBOOKS = list_notebooks()
LESSON_SECTIONS = ("objectives", "run", "exercises", "further reading")


def test_there_are_notebooks():
    assert "01_rlhf_to_dpo" in NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_code_cell_is_parameters(name):
    nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "parameters" in first.get("metadata", {}).get("tags", []), f"{name}: first code cell not tagged"
    params = parameters_cell(name)
    for key in ("PROFILE", "SEED", "OUTPUT_DIR"):
        assert key in params, f"{name}: parameters cell lacks {key}"
    assert params["PROFILE"] == '"smoke"'


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_writes_figures_and_has_a_regression_test(name):
    src = (NOTEBOOK_DIR / f"{name}.ipynb").read_text()
    assert "write_figures(" in src, f"{name} never calls dpo_lab.write_figures"
    tests = list((REPO_ROOT / "tests").glob(f"test_nb_{name[:2]}*.py"))
    assert tests, f"{name} has no tests/test_nb_{name[:2]}_*.py checking its figures"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_lesson_exists_with_its_sections(name):
    path = lesson_path(name)
    assert path.exists(), f"{name} has no lesson {path}"
    text = path.read_text().lower()
    missing = [s for s in LESSON_SECTIONS if not re.search(rf"^#+ .*{s}", text, re.M)]
    assert not missing, f"{path.name} lacks sections: {missing}"


def _markdown_files():
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "lessons").glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name}: broken relative links {broken}"
