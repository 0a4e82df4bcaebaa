"""`dpo-lab run` reports a failing or hanging cell with the notebook, cell, error and path."""
import nbformat
import pytest

from dpo_lab import workbook
from dpo_lab.cli import main

pytestmark = pytest.mark.notebook


def _notebook(folder, name, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = "smoke"\nSEED = 0\nOUTPUT_DIR = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    monkeypatch.setattr(workbook, "NOTEBOOK_DIR", nbdir)
    return nbdir, tmp_path / "out"


def test_failing_cell_is_reported(scratch, capsys):
    nbdir, out = scratch
    _notebook(nbdir, "99_bad", "x = 1\nraise ValueError('the figure drifted')")
    assert main(["run", "99_bad", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "notebook 99_bad failed at cell 3" in err  # markdown, parameters, injected parameters, failing
    assert "ValueError: the figure drifted" in err
    assert str(out / "notebooks" / "99_bad.ipynb") in err
    assert (out / "notebooks" / "99_bad.ipynb").exists()


def test_cell_timeout_is_reported(scratch, capsys):
    nbdir, out = scratch
    _notebook(nbdir, "98_slow", "import time\ntime.sleep(60)")
    assert main(["run", "98_slow", "--out", str(out), "--cell-timeout", "3"]) == 1
    err = capsys.readouterr().err
    assert "notebook 98_slow failed" in err and "timed out after 3s" in err


def test_parameters_reach_the_notebook(scratch):
    nbdir, out = scratch
    _notebook(nbdir, "97_ok", "import dpo_lab\ndpo_lab.write_figures('97_ok', {'seed': SEED, 'p': PROFILE}, OUTPUT_DIR)")
    res = workbook.run_notebook("97_ok", "full", out, {"SEED": 7})
    assert res["figures"] == {"seed": 7, "p": "full"}
