"""Student versions of the notebooks: every solution replaced by a stub, as nbgrader does.

The committed notebooks hold the solutions between nbgrader's markers, in cells that carry nbgrader's
metadata (`solution: true` and a unique `grade_id`), so that an instructor's
`nbgrader generate_assignment` works on them unchanged. `dpo-lab student` writes the same student
versions without an nbgrader course directory.
"""
import copy
import json
import re
from pathlib import Path

from dpo_lab.exercises import STUB

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB_LINES = ["# YOUR CODE HERE", STUB]  # nbgrader's code stub, with a message the checks recognise
CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\d\d\.\d+)["']""")


class MarkerError(ValueError):
    pass


def _source(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region by the stub (at the marker's indentation) and drop
    hidden-test regions."""
    out, inside = [], None
    for n, line in enumerate(source.splitlines(), 1):
        mark = line.strip()
        if mark in (BEGIN, BEGIN_HIDDEN):
            if inside:
                raise MarkerError(f"{where}, line {n}: {mark!r} inside an open {inside!r}")
            inside = mark
            if mark == BEGIN:
                indent = line[:len(line) - len(line.lstrip())]
                out += [indent + s for s in STUB_LINES]
        elif mark in (END, END_HIDDEN):
            want = BEGIN if mark == END else BEGIN_HIDDEN
            if inside != want:
                raise MarkerError(f"{where}, line {n}: {mark!r} without {want!r}")
            inside = None
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: {inside!r} is never closed")
    return "\n".join(out)


def solution_cells(nb: dict) -> list[int]:
    return [i for i, c in enumerate(nb["cells"]) if BEGIN in _source(c)]


def validate(nb: dict, name: str = "notebook") -> list[str]:
    """Problems that would stop nbgrader (or our grading) on this notebook; [] when there are none."""
    problems, seen = [], set()
    for i, cell in enumerate(nb["cells"]):
        src = _source(cell)
        try:
            strip_solutions(src, f"{name} cell {i}")
        except MarkerError as e:
            problems.append(str(e))
        meta = cell.get("metadata", {}).get("nbgrader")
        if BEGIN in src and not (meta and meta.get("solution")):
            problems.append(f"{name} cell {i}: a solution region in a cell without nbgrader metadata "
                            "'solution: true' (nbgrader generate_assignment refuses it)")
        if meta:
            gid = meta.get("grade_id")
            if not gid:
                problems.append(f"{name} cell {i}: nbgrader metadata without a grade_id")
            elif gid in seen:
                problems.append(f"{name} cell {i}: duplicate nbgrader grade_id {gid!r}")
            seen.add(gid)
    return problems


def nbgrader_metadata(grade_id: str, solution: bool) -> dict:
    """What nbgrader's create_assignment toolbar writes: a solution cell, or a locked check cell."""
    return {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": not solution,
                         "schema_version": 3, "solution": solution, "task": False}}


def student_version(nb: dict, name: str = "notebook") -> dict:
    problems = validate(nb, name)
    if problems:
        raise MarkerError("; ".join(problems))
    out = copy.deepcopy(nb)
    for i, cell in enumerate(out["cells"]):
        src = _source(cell)
        if BEGIN in src or BEGIN_HIDDEN in src:
            cell["source"] = strip_solutions(src, f"{name} cell {i}")
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return out


def checked_exercises(nb: dict) -> list[str]:
    """The exercise ids that the notebook's check cells grade, in order."""
    return [m for c in nb["cells"] if c["cell_type"] == "code" for m in CHECK_CALL.findall(_source(c))]


def write_student_versions(names: list[str], out_dir) -> list[Path]:
    from dpo_lab.workbook import notebook_path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        nb = json.loads(notebook_path(name).read_text(encoding="utf-8"))
        path = out_dir / f"{name}.ipynb"
        path.write_text(json.dumps(student_version(nb, name), indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        written.append(path)
    return written


def new_exercise_cells(id: str, brief: str, solution: str, check: str) -> list[dict]:
    """Authoring aid: the brief (markdown), the solution cell (the body between the markers) and
    the check cell of exercise `id`, with nbgrader's metadata, ready to insert into a notebook."""
    import nbformat
    gid = "ex" + id.replace(".", "_")
    md = nbformat.v4.new_markdown_cell(brief)
    sol = nbformat.v4.new_code_cell(solution, metadata=nbgrader_metadata(gid, solution=True))
    chk = nbformat.v4.new_code_cell(check, metadata=nbgrader_metadata(gid + "_check", solution=False))
    return [md, sol, chk]
