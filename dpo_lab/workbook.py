"""The workbook's notebooks: find them, read their lessons, execute them with papermill."""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_lab.paths import LESSON_DIR, NOTEBOOK_DIR, build_dir

DEFAULT_CELL_TIMEOUT = 900  # seconds; the full profile of the DPO run is the slowest cell


def list_notebooks() -> list[str]:
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"no notebook {name!r}; have: {', '.join(list_notebooks()) or 'none'}")
    return path


def lesson_path(name: str) -> Path:
    return LESSON_DIR / f"{name}.md"


def lesson_title(name: str) -> str:
    path = lesson_path(name)
    if not path.exists():
        return "(no lesson)"
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return name


def parameters_cell(name: str) -> dict:
    """The names and values assigned in the cell tagged `parameters` (simple literals only)."""
    nb = json.loads(notebook_path(name).read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            values = {}
            for m in re.finditer(r"^(\w+)\s*=\s*(.+?)\s*(#.*)?$", src, re.M):
                values[m.group(1)] = m.group(2)
            return values
    raise ValueError(f"notebook {name!r} has no cell tagged 'parameters'")


@dataclass
class NotebookFailed(Exception):
    notebook: str
    cell_index: int | None
    error: str
    executed_path: Path

    def __str__(self):
        where = f"cell {self.cell_index}" if self.cell_index is not None else "unknown cell"
        return (f"notebook {self.notebook} failed at {where}: {self.error}\n"
                f"partly executed notebook: {self.executed_path}")


def _failed_cell_index(path: Path):
    """papermill marks the failing cell; find it in the partly executed notebook."""
    try:
        nb = json.loads(path.read_text())
    except Exception:
        return None
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i
    return None


def _kernel_config() -> dict:
    """papermill keyword arguments that give the kernel encrypted sockets (CurveZMQ keys from
    jupyter_client >= 8.10 when the kernelspec declares it reads them, as ipykernel 7.4's does).
    Plain TCP makes ipykernel 7.4 log "Kernel is running over TCP without encryption" to the
    terminal of every run. Older jupyter_client, or a pyzmq without Curve: left as it was."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    if not KernelManager.class_traits().get("transport_encryption") or not zmq.has("curve"):
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


def run_notebook(name: str, profile: str = "smoke", output_dir=None, parameters: dict | None = None,
                 cell_timeout: int = DEFAULT_CELL_TIMEOUT, log_output: bool = False,
                 source_dir=None) -> dict:
    """Execute one notebook headlessly; return {'seconds', 'notebook', 'figures'} or raise NotebookFailed.

    `source_dir`: run `<source_dir>/<name>.ipynb` instead of the workbook's own (e.g. the student
    versions that `dpo-lab student` writes); it still runs in notebooks/, so its links resolve."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    if source_dir is None:
        src = notebook_path(name)
    else:
        src = Path(source_dir) / f"{name}.ipynb"
        if not src.exists():
            raise FileNotFoundError(f"no notebook {src}")
    out = build_dir(output_dir)
    executed = out / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {"PROFILE": profile, "OUTPUT_DIR": str(out), **(parameters or {})}
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(src), str(executed), parameters=params, kernel_name="python3",
            cwd=str(NOTEBOOK_DIR), execution_timeout=cell_timeout, progress_bar=False,
            log_output=log_output, **_kernel_config(),
        )
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(name, e.cell_index, f"{e.ename}: {e.evalue}", executed) from None
    except CellTimeoutError as e:
        raise NotebookFailed(name, _failed_cell_index(executed),
                             f"cell timed out after {cell_timeout}s ({e})", executed) from None
    seconds = time.perf_counter() - start
    figures_file = out / "metrics" / f"{name}.json"
    if not figures_file.exists():
        raise NotebookFailed(name, None, f"ran, but wrote no figures to {figures_file}", executed)
    return {"seconds": seconds, "notebook": executed, "figures": json.loads(figures_file.read_text())}


# --- library noise in executed notebooks ---------------------------------------------------------

# A progress bar's line ends in tqdm's timing bracket: "[00:03<00:05, 2.1it/s]", "[00:00<?, ?it/s]",
# "[01:02:03, 4.5s/it]" (unknown total). Warnings and log lines never do.
_PROGRESS = re.compile(r"\[(?:\d+:)?\d\d:\d\d(?:<(?:(?:\d+:)?\d\d:\d\d|\?))?(?:,[^\]]*)?\]\s*$")
# On stdout only what looks like a warning is noise (stdout is where notebooks print their results):
# "FutureWarning: ...", "warnings.warn(", logging's "WARNING", c10's "[W1203 10:11:12.123 file.cpp:9]".
_NOISY_STDOUT = re.compile(r"\b(?:[A-Z][a-z]+)*Warning\b|\bWARNING\b|\bwarnings\.warn\b|^\[W[\d ]")


def _lines(text) -> list[str]:
    text = "".join(text) if isinstance(text, list) else text
    return [s.strip() for s in re.split(r"[\r\n]+", text) if s.strip()]  # \r: tqdm redraws a line


def output_noise(executed_notebook_path) -> list[str]:
    """Lines of library noise in an executed notebook's outputs, each as "cell <index>: <line>".

    Noise is every line written to stderr (warnings, logging, C++ messages), except tqdm's progress
    bars, plus any stdout line that looks like a warning. Error outputs are not noise: a failed
    cell fails the run."""
    import nbformat
    nb = nbformat.read(str(executed_notebook_path), as_version=4)
    noise = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") != "stream":
                continue
            for line in _lines(out.get("text", "")):
                if out.get("name") == "stderr":
                    noisy = not _PROGRESS.search(line)
                else:
                    noisy = bool(_NOISY_STDOUT.search(line))
                if noisy:
                    noise.append(f"cell {i}: {line}")
    return noise
