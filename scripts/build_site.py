"""Build the course site: lessons + executed notebooks -> static HTML (Sphinx + MyST-NB).

    python scripts/build_site.py [--notebooks build/notebooks] [--out build/site]

Lays out a Sphinx source tree under OUT/src that mirrors the repository (lessons/, notebooks/), so
the relative links between lessons and notebooks resolve as they are; a link to any other file of
the repository (code, configs) is pointed at a generated page that shows that file. Each notebook
page uses the executed copy from --notebooks (outputs and plots) when it is there and still matches
the source notebook's code, else the output-free source notebook with a note saying so. Nothing is
executed here (MyST-NB's execution is off), and the repository's notebooks stay output-free.
HTML goes to OUT/html; Sphinx runs with -W, so a link it cannot resolve fails the build.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "site"  # conf.py and the site's own static files

# Notebook outputs of ipywidgets (tqdm bars) need the widget JS from a CDN, which a closed network
# (and the offline site) does not have: their text/plain twin is kept instead.
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# [text](target "title") and [label]: target; a target in <...> may hold spaces.
INLINE_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*(<[^>]*>|[^)\s]+)((?:\s+\"[^\"]*\")?\s*)\)")
REF_DEF = re.compile(r"^( {0,3}\[[^\]]+\]:\s*)(<[^>]*>|\S+)", re.M)
# <details><summary>S</summary>BODY</details>: CommonMark passes an HTML block through as raw HTML
# (and a line that starts with </summary> opens one), so BODY's maths, code and emphasis would stay
# plain text. Blank lines around BODY make it Markdown again (as GitHub does), with the tags as
# HTML blocks of their own, indented to stay inside a list item.
DETAILS = re.compile(r"<details>\s*<summary>(.*?)</summary>(.*?)</details>[ \t]*", re.S)
LIST_ITEM = re.compile(r"[ \t]*(?:\d+[.)]|[-*+])[ \t]+|[ \t]*")
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})", re.M)


class LinkError(ValueError):
    pass


def _split_fences(text: str):
    """Yield (is_code, chunk): links inside fenced code blocks are text, not links."""
    pos, in_code, fence = 0, False, ""
    for m in FENCE.finditer(text):
        if not in_code:
            yield False, text[pos:m.start()]
            pos, in_code, fence = m.start(), True, m.group(2)
        elif m.group(2)[0] == fence[0] and len(m.group(2)) >= len(fence):
            end = text.find("\n", m.end())
            end = len(text) if end < 0 else end + 1
            yield True, text[pos:end]
            pos, in_code = end, False
    yield in_code, text[pos:]


class Site:
    def __init__(self, src: Path):
        self.src = src
        self.code_pages: dict[str, str] = {}  # repo path -> page path (in src)

    def map_target(self, target: str, where: str, image: bool) -> str:
        """The link `target`, written in repository file `where`, as a link that resolves in the site."""
        bracket = target.startswith("<")
        raw = target[1:-1] if bracket else target
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", raw) or raw.startswith(("#", "/")) or not raw:
            return target  # external, in-page or site-absolute: left as written
        path, _, frag = raw.partition("#")
        here = posixpath.dirname(where)
        repo_path = posixpath.normpath(posixpath.join(here, path))
        if repo_path.startswith("../") or not (REPO / repo_path).exists():
            raise LinkError(f"{where}: link to {raw!r} points at {repo_path!r}, which is not in the repository")
        if re.fullmatch(r"lessons/[^/]+\.md|notebooks/[^/]+\.ipynb", repo_path):
            return target  # the site mirrors these folders: the link resolves as written
        if image:
            self._copy(repo_path)
            return target
        page = self._code_page(repo_path)
        new = posixpath.relpath(page, here or ".") + (f"#{frag}" if frag else "")
        return f"<{new}>" if bracket else new

    def _copy(self, repo_path: str):
        dest = self.src / repo_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / repo_path, dest)

    def _code_page(self, repo_path: str) -> str:
        """A page that shows one file (or lists one folder) of the repository."""
        if repo_path in self.code_pages:
            return self.code_pages[repo_path]
        page = f"code/{repo_path.rstrip('/')}.md"
        self.code_pages[repo_path] = page
        out = self.src / page
        out.parent.mkdir(parents=True, exist_ok=True)
        full = REPO / repo_path
        head = f"---\norphan: true\n---\n\n# `{repo_path}`\n\n"
        if full.is_dir():
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in full.iterdir()
                           if not p.name.startswith((".", "__pycache__")))
            out.write_text(head + "A folder of the repository:\n\n" + "".join(f"- `{n}`\n" for n in names))
        else:
            self._copy(repo_path)  # literalinclude reads the copy inside the source tree
            lang = {".py": "python", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json",
                    ".md": "markdown", ".sh": "bash"}.get(full.suffix, "text")
            rel = posixpath.relpath(repo_path, posixpath.dirname(page))
            out.write_text(head + f"```{{literalinclude}} {rel}\n:language: {lang}\n:linenos:\n```\n")
        return page

    def rewrite(self, text: str, where: str) -> str:
        """Every relative link of a Markdown text (outside fenced code) mapped into the site."""
        def inline(m):
            return f"{m.group(1)}[{m.group(2)}]({self.map_target(m.group(3), where, bool(m.group(1)))}{m.group(4)})"

        def refdef(m):
            return m.group(1) + self.map_target(m.group(2), where, False)

        return "".join(chunk if code else _open_details(REF_DEF.sub(refdef, INLINE_LINK.sub(inline, chunk)))
                       for code, chunk in _split_fences(text))


def _open_details(text: str) -> str:
    def sub(m):
        line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        indent = " " * len(LIST_ITEM.match(line).group(0))  # a list item's content column
        summary, body = " ".join(m.group(1).split()), m.group(2).strip()
        lead = "\n\n" + indent if line.strip() else ""
        rest = text[m.end():text.find("\n", m.end()) % (len(text) + 1)]
        tail = "\n\n" + indent if rest.strip() else ""  # text after </details> is a paragraph again
        return f"{lead}<details><summary>{summary}</summary>\n\n{indent}{body}\n\n{indent}</details>{tail}"
    return DETAILS.sub(sub, text)


def _code_sources(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def _strip_widgets(nb):
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if WIDGET_MIME in out.get("data", {}):
                del out["data"][WIDGET_MIME]
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "data" not in o or o["data"]]


def notebook_for_site(name: str, executed_dir: Path | None):
    """(notebook, status): the executed copy when it matches the source's code, else the source."""
    source = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    executed = executed_dir / f"{name}.ipynb" if executed_dir else None
    if executed and executed.exists():
        nb = nbformat.read(executed, as_version=4)
        if _code_sources(nb) == _code_sources(source):
            _strip_widgets(nb)
            return nb, "executed"
        why, short = f"the executed copy in `{executed_dir.name}/` is older than the notebook's code", "stale"
    else:
        why, short = "no executed copy was found", "not executed"
    note = ("```{note}\nThis page shows the notebook without its outputs: " + why +
            f". Run `dpo-lab run {name}`, then `make site`, to see them here.\n```")
    # Placed after the title so that the title stays the page's heading.
    first = source.cells[0] if source.cells else None
    at = 1 if first is not None and first.cell_type == "markdown" and first.source.lstrip().startswith("# ") else 0
    source.cells.insert(at, nbformat.v4.new_markdown_cell(note))
    return source, f"without outputs ({short})"


def _title(md: str, fallback: str) -> str:
    m = re.search(r"^#\s+(.+)$", md, re.M)
    return m.group(1).strip() if m else fallback


def assemble(src: Path, executed_dir: Path | None) -> dict:
    """Write the Sphinx source tree; returns what was used for each notebook."""
    if src.exists():
        shutil.rmtree(src)
    (src / "lessons").mkdir(parents=True)
    (src / "notebooks").mkdir()
    site = Site(src)
    lessons = sorted(p.stem for p in (REPO / "lessons").glob("[0-9][0-9]_*.md"))
    notebooks = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    titles, used = {}, {}
    for name in lessons:
        text = (REPO / "lessons" / f"{name}.md").read_text(encoding="utf-8")
        titles[name] = _title(text, name)
        (src / "lessons" / f"{name}.md").write_text(site.rewrite(text, f"lessons/{name}.md"), encoding="utf-8")
    for name in notebooks:
        nb, used[name] = notebook_for_site(name, executed_dir)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = site.rewrite(cell.source, f"notebooks/{name}.ipynb")
        nbformat.write(nb, src / "notebooks" / f"{name}.ipynb")
    (src / "index.md").write_text(_index(lessons, notebooks, titles), encoding="utf-8")
    return used


def _index(lessons, notebooks, titles) -> str:
    rows = []
    for name in sorted(set(lessons) | set(notebooks)):
        lesson = f"[{titles[name]}](lessons/{name}.md)" if name in lessons else ""
        nb = f"[{name}](notebooks/{name}.ipynb)" if name in notebooks else ""
        rows.append(f"| {name[:2]} | {lesson} | {nb} |")
    return "\n".join([
        "# dpo-lab",
        "",
        "A workbook for learning how large language models are aligned with **DPO** and how they are "
        "**trained at scale**. Each lesson is a short text, and a notebook computes every claim it makes; "
        "the notebooks shown here were run with the smoke profile on a CPU (`dpo-lab run`).",
        "",
        "| # | lesson | notebook |",
        "|---|---|---|",
        *rows,
        "",
        "```{toctree}\n:caption: Lessons\n:hidden:\n\n" + "\n".join(f"lessons/{n}" for n in lessons) + "\n```",
        "",
        "```{toctree}\n:caption: Notebooks\n:hidden:\n\n" + "\n".join(f"notebooks/{n}" for n in notebooks) + "\n```",
        "",
    ])


def build(out: Path, executed_dir: Path | None) -> dict:
    t0 = time.perf_counter()
    used = assemble(out / "src", executed_dir)
    html = out / "html"
    # -W: a reference Sphinx cannot resolve (a broken link) fails the build; -E: no stale pages.
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-q",
           "-c", str(CONF_DIR), str(out / "src"), str(html)]
    subprocess.run(cmd, check=True)
    report = {"pages": sorted(str(p.relative_to(html)) for p in html.rglob("*.html")
                              if not p.relative_to(html).parts[0].startswith("_")),
              "notebooks": used, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "build.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", type=Path, default=REPO / "build" / "notebooks",
                    help="executed notebooks (from `dpo-lab run`); default build/notebooks")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "site")
    ap.add_argument("--require-executed", action="store_true",
                    help="fail unless every notebook page has its outputs (CI, after `make test`)")
    args = ap.parse_args(argv)
    if not args.notebooks.is_dir():
        print(f"build_site: no executed notebooks in {args.notebooks}: the pages show the source notebooks",
              file=sys.stderr)
    try:
        report = build(args.out.resolve(), args.notebooks.resolve() if args.notebooks.is_dir() else None)
    except LinkError as e:
        sys.exit(f"build_site: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"build_site: sphinx-build failed (exit {e.returncode}); its messages are above")
    for name, how in report["notebooks"].items():
        print(f"  {name}: {how}")
    missing = [n for n, how in report["notebooks"].items() if how != "executed"]
    if args.require_executed and missing:
        sys.exit(f"build_site: no up-to-date executed copy in {args.notebooks} for {missing}")
    print(f"build_site: {len(report['pages'])} pages in {args.out / 'html'} ({report['seconds']} s); "
          f"open {args.out / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
