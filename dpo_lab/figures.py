"""The one metrics writer: each notebook ends by writing its figures here.

A figures file is a flat JSON object of named numbers (and short strings), at
<OUTPUT_DIR>/metrics/<notebook>.json, which pytest checks with tolerances.
"""
import json
import math
import numbers
from pathlib import Path

from dpo_lab.paths import build_dir

MAX_STRING = 200


def _clean(key, value):
    if not isinstance(key, str) or not key:
        raise TypeError(f"figure name must be a non-empty string, got {key!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"figure {key!r} is not finite: {value}")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"figure {key!r} is a string of {len(value)} chars (max {MAX_STRING})")
        return value
    raise TypeError(f"figure {key!r} must be a number or a short string, got {type(value).__name__}")


def figures_path(name: str, output_dir=None) -> Path:
    return build_dir(output_dir) / "metrics" / f"{name}.json"


def write_figures(name: str, figures: dict, output_dir=None) -> Path:
    """Validate and write `figures` (flat: name -> number or short string); returns the path."""
    clean = {k: _clean(k, v) for k, v in figures.items()}
    path = figures_path(name, output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def read_figures(name: str, output_dir=None) -> dict:
    path = figures_path(name, output_dir)
    if not path.exists():
        raise FileNotFoundError(f"no figures for notebook {name!r}: {path} does not exist (run it first)")
    return json.loads(path.read_text())
