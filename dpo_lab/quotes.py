"""Numbers that lessons quote, tied to the run that produced them.

Every lesson ends with a block that says where each decimal number in its prose comes from:

    <!-- numbers
    "stalled (3.94)"          smoke 02_normalization:post_norm_d12_final_loss
    "0.49 in the notebook"    smoke scratch_rmsnorm_over_layernorm_time
    "loss 1.23 at depth 48"   full  post_norm_d48_final_loss
    "≈0.36–0.49 GB/s"         timing
    "β = 0.1"                 given
    -->

- `smoke KEY` / `full KEY`: the number in the quoted snippet must equal the figure KEY, rounded to
  the digits the lesson prints (a trailing `%` means the figure is a fraction). `smoke` figures are
  those the notebook writes in the smoke profile (checked whenever the tests run the notebook);
  `full` figures are read from `results/<notebook>.json`, which `dpo-lab run --profile full
  --results` writes together with the machine it ran on. KEY is `figure` (the lesson's own notebook)
  or `notebook:figure`.
- `timing`: a wall-clock figure from a shared machine: quoted as a range, with the machine named.
- `given`: not measured by the workbook: a setting, a formula's constant, a paper's figure.

`unaccounted(lesson)` lists the decimal numbers of the prose (outside code and maths) that no snippet
covers, so a new number cannot slip into a lesson without saying where it comes from.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from dpo_lab.paths import LESSON_DIR, REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
KINDS = ("smoke", "full", "timing", "given")
_BLOCK = re.compile(r"<!--\s*numbers\s*\n(.*?)-->", re.S)
_ENTRY = re.compile(r'^\s*"(?P<snippet>[^"]+)"\s+(?P<kind>\w+)(?:\s+(?P<key>\S+))?\s*$')
_NUMBER = re.compile(r"(?<![\w.,])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-−]?\d+)?")
_TARGET = re.compile(r"\{([-−]?\d[\d,]*(?:\.\d+)?(?:e[-−]?\d+)?)\}")
_DECIMAL = re.compile(r"(?<![\w.,])(?:\d+\.\d+(?:e[-−]?\d+)?|\d{1,3}(?:,\d{3})+)(?![\d,]*\d)")  # 0.49, 1.7e-5, 37,568


class QuoteError(ValueError):
    pass


@dataclass
class Quote:
    lesson: str
    raw: str      # as written in the block: the number compared may be marked {like.this}
    kind: str
    notebook: str | None = None
    figure: str | None = None
    line: int = 0

    @property
    def snippet(self) -> str:
        """The text as it stands in the lesson."""
        return _TARGET.sub(r"\1", self.raw)

    @property
    def where(self) -> str:
        return f"lessons/{self.lesson}.md, numbers block line {self.line}"


def _lesson_text(lesson: str) -> str:
    return (LESSON_DIR / f"{lesson}.md").read_text(encoding="utf-8")


def quotes(lesson: str, text: str | None = None) -> list[Quote]:
    """The entries of the lesson's numbers block (an empty list if it has none)."""
    text = _lesson_text(lesson) if text is None else text
    m = _BLOCK.search(text)
    if not m:
        return []
    first = text[:m.start(1)].count("\n") + 1
    out = []
    for i, raw in enumerate(m.group(1).splitlines()):
        if not raw.strip():
            continue
        e = _ENTRY.match(raw)
        if not e:
            raise QuoteError(f"lessons/{lesson}.md line {first + i}: cannot read {raw.strip()!r}; "
                             'expected: "snippet" smoke|full|timing|given [KEY]')
        kind, key = e["kind"], e["key"]
        if kind not in KINDS:
            raise QuoteError(f"lessons/{lesson}.md line {first + i}: kind {kind!r} is not one of {KINDS}")
        if (kind in ("smoke", "full")) != bool(key):
            raise QuoteError(f"lessons/{lesson}.md line {first + i}: {kind} " +
                             ("needs a figure KEY" if key is None else f"takes no KEY (got {key!r})"))
        nb, fig = (key.split(":", 1) if ":" in key else (lesson, key)) if key else (None, None)
        out.append(Quote(lesson, e["snippet"], kind, nb, fig, first + i))
    return out


def _blank(text: str, pattern: str, flags=0, keep: int = 0) -> str:
    """Overwrite each match with spaces (newlines kept), so positions still match the original."""
    def spaces(m):
        return m.group()[:keep] + re.sub(r"[^\n]", " ", m.group()[keep:])
    return re.sub(pattern, spaces, text, flags=flags)


def _prose(text: str) -> str:
    """The lesson with its numbers block, code, maths, link targets and arXiv ids blanked out."""
    text = _blank(text, _BLOCK.pattern, re.S)
    text = _blank(text, r"```.*?```", re.S)
    text = _blank(text, r"\$\$.*?\$\$", re.S)
    text = _blank(text, r"\$[^$\n]+\$")
    text = _blank(text, r"`[^`\n]+`")
    text = _blank(text, r"\]\([^)]*\)", keep=1)
    text = _blank(text, r"https?://\S+")
    text = _blank(text, r"arXiv:\s*\d+\.\d+(v\d+)?")  # identifiers, not numbers
    # exercise ids: **04.1, exercise 04.1, exercises 07.1 and 07.2
    text = _blank(text, r"(?:\*\*|[Ee]xercises? )\d\d\.\d+\b(?:(?:,| and| or|,? and) \d\d\.\d+\b)*")
    return _blank(text, r"<!--.*?-->", re.S)


def unaccounted(lesson: str, text: str | None = None) -> list[str]:
    """Decimal numbers (and numbers with thousands separators) in the prose that lie in no snippet of
    the numbers block, with their line."""
    text = _lesson_text(lesson) if text is None else text
    snippets = [q.snippet for q in quotes(lesson, text)]
    out = []
    for line, prose in zip(text.splitlines(), _prose(text).splitlines()):
        covered = [(m.start(), m.end()) for s in snippets for m in re.finditer(re.escape(s), line)]
        for m in _DECIMAL.finditer(prose):
            if not any(a <= m.start() and m.end() <= b for a, b in covered):
                out.append(f"{m.group()} in {line.strip()[:90]!r}")
    return out


def missing_snippets(lesson: str, text: str | None = None) -> list[str]:
    """Snippets of the block that the lesson does not contain (stale after an edit), or contains more
    than once (ambiguous: lengthen them)."""
    text = _lesson_text(lesson) if text is None else text
    prose = _BLOCK.sub("", text)
    out = []
    for q in quotes(lesson, text):
        n = prose.count(q.snippet)
        if n != 1:
            out.append(f"{q.where}: {q.snippet!r} is " + ("not in the lesson" if n == 0 else
                                                           f"in the lesson {n} times: lengthen it"))
    return out


def _quoted_value(q: Quote) -> tuple[float, float, bool]:
    """The number compared (the one marked {like.this}, else the snippet's only number), half a unit
    of its last printed digit, and whether a % follows it."""
    marked = list(_TARGET.finditer(q.raw))
    if marked:
        if len(marked) > 1:
            raise QuoteError(f"{q.where}: {q.raw!r} marks {len(marked)} numbers; mark one")
        s, after = marked[0].group(1), q.raw[marked[0].end():]
    else:
        nums = list(_NUMBER.finditer(q.raw))
        if len(nums) != 1:
            raise QuoteError(f"{q.where}: {q.raw!r} holds {len(nums)} numbers: mark the one that "
                             "is compared with braces, e.g. \"| 12 | trained ({1.56})\"")
        s, after = nums[0].group(), q.raw[nums[0].end():]
    s = s.replace("−", "-").replace(",", "")
    mant = s.split("e")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    exp = int(s.split("e")[1]) if "e" in s else 0
    return float(s), 0.5 * 10.0 ** (exp - decimals), after.lstrip().startswith("%")


def compare(q: Quote, value) -> str | None:
    """None if the quoted number is `value` as printed (rounded to the quoted digits); else what differs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{q.where}: figure {q.notebook}:{q.figure} is {value!r}, not a number"
    try:
        quoted, half_unit, pct = _quoted_value(q)
    except QuoteError as e:
        return str(e)
    actual = value * 100 if pct else value
    if not (math.isfinite(actual) and abs(actual - quoted) <= half_unit * (1 + 1e-9)):
        return (f"{q.where}: the lesson says {q.snippet!r} but the {q.kind} run gives "
                f"{q.notebook}:{q.figure} = {actual:.6g}{'%' if pct else ''}")
    return None


def check_smoke(notebook: str, figures: dict) -> list[str]:
    """Every smoke quote, in any lesson, of `notebook`'s figures, against those figures."""
    problems = []
    for lesson in sorted(p.stem for p in LESSON_DIR.glob("[0-9][0-9]_*.md")):
        for q in quotes(lesson):
            if q.kind == "smoke" and q.notebook == notebook:
                if q.figure not in figures:
                    problems.append(f"{q.where}: the smoke run of {notebook} writes no figure {q.figure!r}")
                elif (msg := compare(q, figures[q.figure])) is not None:
                    problems.append(msg)
    return problems


def read_results(notebook: str) -> dict:
    path = RESULTS_DIR / f"{notebook}.json"
    if not path.exists():
        raise FileNotFoundError(f"no full-profile results for {notebook}: {path} (make them with "
                                f"`dpo-lab run {notebook} --profile full --results`)")
    return json.loads(path.read_text(encoding="utf-8"))


def check_full(lesson: str) -> list[str]:
    problems = []
    for q in quotes(lesson):
        if q.kind != "full":
            continue
        try:
            figures = read_results(q.notebook)["figures"]
        except FileNotFoundError as e:
            problems.append(f"{q.where}: {e}")
            continue
        if q.figure not in figures:
            problems.append(f"{q.where}: results/{q.notebook}.json has no figure {q.figure!r}")
        elif (msg := compare(q, figures[q.figure])) is not None:
            problems.append(msg)
    return problems


def write_results(notebook: str, figures: dict, seconds: float, results_dir: Path | None = None) -> Path:
    """results/<notebook>.json: a full-profile run's figures and the machine it ran on."""
    import datetime
    import os
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    path = (results_dir or RESULTS_DIR) / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"notebook": notebook, "profile": "full", "seconds": round(seconds, 1),
                                "machine": machine, "figures": figures}, indent=1, sort_keys=True) + "\n",
                    encoding="utf-8")
    return path
