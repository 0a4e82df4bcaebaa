"""Benchmarks: `dpo-lab bench NAME` runs the compared variants side by side in one process.

A benchmark is a module `dpo_lab/bench/<name>.py` with

    def run(quick: bool = False) -> Table | list[Table]

Each Table holds rows of measurements; a row's `variant` column names what was measured,
and within each group (rows equal on `group_by`) every row gets `ratio` = its `metric`
divided by the `baseline` variant's. The tables are printed and written together to
build/bench/<name>.json with the machine they ran on; a table's `notes["figures"]` (its headline
ratios) are also top-level keys of that JSON.
"""
import importlib
import json
import pkgutil
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from dpo_lab.paths import build_dir


@dataclass
class Table:
    title: str
    rows: list[dict]
    metric: str                      # the column compared, e.g. "ms" or "tokens_per_s"
    baseline: str                    # the variant every other is divided by
    group_by: tuple = ()             # columns that define one comparison (e.g. ("shape",))
    higher_is_better: bool = False   # True for throughputs
    notes: dict = field(default_factory=dict)

    def with_ratios(self) -> "Table":
        def key(row):
            return tuple(row.get(c) for c in self.group_by)
        base = {key(r): r[self.metric] for r in self.rows if r["variant"] == self.baseline}
        for r in self.rows:
            b = base.get(key(r))
            r[f"ratio_vs_{self.baseline}"] = (r[self.metric] / b) if b else None
        return self


def available() -> list[str]:
    import dpo_lab.bench as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def median_time(fn, *, warmup: int = 2, repeat: int = 10, sync=None) -> float:
    """Median wall time of fn() in seconds; `sync` (e.g. torch.cuda.synchronize) is called around it."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def format_table(table: Table) -> str:
    cols = list(dict.fromkeys(k for r in table.rows for k in r))
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in table.rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    better = "higher" if table.higher_is_better else "lower"
    out = [f"== {table.title}  ({table.metric}: {better} is better)", line(cols),
           line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(name: str, quick: bool = False, output_dir=None) -> dict:
    if name not in available():
        raise KeyError(f"no benchmark {name!r}; have: {', '.join(available()) or 'none'}")
    module = importlib.import_module(f"dpo_lab.bench.{name}")
    tables = module.run(quick=quick)
    tables = [tables] if isinstance(tables, Table) else list(tables)
    for t in tables:
        t.with_ratios()
        print(format_table(t), end="\n\n")
    result = {"bench": name, "quick": quick, "machine": machine(),
              "tables": [asdict(t) for t in tables]}
    # a table's headline numbers (notes["figures"]) also go to the top level, where readers look first
    for t in tables:
        for key, value in t.notes.get("figures", {}).items():
            if key in result:
                raise ValueError(f"figure {key!r} of table {t.title!r} clashes with a top-level key")
            result[key] = value
    path = build_dir(output_dir) / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return result
