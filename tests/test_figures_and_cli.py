import math

import pytest

from dpo_lab import read_figures, write_figures
from dpo_lab.bench import Table, format_table
from dpo_lab.cli import main


def test_figures_roundtrip(tmp_path):
    import numpy as np
    import torch
    path = write_figures("nb", {"a": 1, "b": np.float32(0.5), "c": torch.tensor(2.0), "d": "ok"}, tmp_path)
    assert path == tmp_path / "metrics" / "nb.json"
    assert read_figures("nb", tmp_path) == {"a": 1, "b": 0.5, "c": 2.0, "d": "ok"}


@pytest.mark.parametrize("bad, match", [
    ({"x": math.nan}, "not finite"), ({"x": [1, 2]}, "number or a short string"),
    ({"x": "y" * 500}, "500 chars"), ({"": 1}, "non-empty"),
])
def test_figures_reject_bad_values_by_name(tmp_path, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        write_figures("nb", bad, tmp_path)


def test_missing_figures_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="run it first"):
        read_figures("nope", tmp_path)


def test_bench_ratios_per_group():
    t = Table("t", [{"variant": "torch", "n": 1, "ms": 2.0}, {"variant": "ours", "n": 1, "ms": 3.0},
                    {"variant": "torch", "n": 2, "ms": 4.0}, {"variant": "ours", "n": 2, "ms": 2.0}],
              metric="ms", baseline="torch", group_by=("n",)).with_ratios()
    assert [r["ratio_vs_torch"] for r in t.rows] == [1.0, 1.5, 1.0, 0.5]
    assert "ratio_vs_torch" in format_table(t)


def test_cli_list_shows_lesson_titles(capsys):
    assert main(["list"]) == 0
    assert "01_rlhf_to_dpo" in capsys.readouterr().out


def test_cli_run_unknown_notebook_is_named():
    with pytest.raises(FileNotFoundError, match="no notebook 'nope'"):
        main(["run", "nope"])


def test_cli_bad_param_is_rejected():
    with pytest.raises(SystemExit):
        main(["run", "-p", "novalue"])
