"""The built course site, opened in headless Chromium: every page loads without console errors,
every image is rendered, every internal link resolves, the maths is typeset, and the navigation
reaches every lesson and notebook.

Run by `make site-test` (after `make site`); DPO_LAB_SITE names the build (default build/site,
which holds html/, the Sphinx source src/ and build.json from scripts/build_site.py).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nbformat
import pytest

from cdp import Browser, find_chromium

REPO = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("DPO_LAB_SITE", REPO / "build" / "site")).resolve()
HTML = SITE / "html"

# Run in the page once it has loaded: waits for MathJax's typesetting and the web fonts, then
# reports what the checks below need.
PROBE = r"""(async () => {
  const maths = [...document.querySelectorAll('.math')];
  if (maths.length) {
    if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return {mathjax: false};
    await MathJax.startup.promise;
  }
  await document.fonts.ready;
  const size = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    mathjax: true,
    title: document.title,
    maths: maths.length,
    typeset: maths.filter(m => m.querySelector('mjx-container')).length,
    raw: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60)),
    merrors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 60)),
    images: [...document.querySelectorAll('img')].map(i => ({
      src: i.currentSrc || i.src, natural: [i.naturalWidth, i.naturalHeight], shown: size(i)})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id)
         .concat([...document.querySelectorAll('a[name]')].map(a => a.name)),
    nav: [...document.querySelectorAll('nav.bd-links a[href]')].map(a => a.href),
  };
})()"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    assert (HTML / "index.html").exists(), f"no site in {HTML}: build it with `make site`"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_Quiet, directory=str(HTML)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def pages() -> list[str]:
    """Every HTML page of the site (Sphinx's own folders _static, _sources... hold none to visit)."""
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if not p.relative_to(HTML).parts[0].startswith("_"))


def _problems(events, session) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among CDP events."""
    out = []
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        m, p = ev["method"], ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                for a in p["args"]))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')}")
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
    return out


@pytest.fixture(scope="module")
def crawl(server):
    """{page: probe result + its console problems}, every page opened once in one browser."""
    exe = find_chromium()
    assert exe, "Chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/it)"
    browser = Browser(exe)
    result = {}
    try:
        browser.open_page()
        for page in pages():
            mark = len(browser.events)
            browser.send("Page.navigate", {"url": server + page})
            browser.wait_event("Page.loadEventFired", since=mark)
            probe = browser.evaluate(PROBE)
            probe["console"] = _problems(browser.events[mark:], browser.session)
            result[page] = probe
    finally:
        browser.close()
    return result


def test_site_has_every_lesson_and_notebook():
    want = [f"lessons/{p.stem}.html" for p in sorted((REPO / "lessons").glob("[0-9][0-9]_*.md"))]
    want += [f"notebooks/{p.stem}.html" for p in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    missing = sorted(set(want) - set(pages()))
    assert len(want) >= 2 and not missing, f"pages missing from {HTML}: {missing}"


def test_pages_load_without_console_errors(crawl):
    bad = {page: r["console"] for page, r in crawl.items() if r["console"]}
    assert not bad, "console errors:\n" + json.dumps(bad, indent=1)


def test_every_image_is_rendered(crawl):
    bad = [f"{page}: {img['src'][:100]} natural {img['natural']} shown {img['shown']}"
           for page, r in crawl.items() for img in r.get("images", [])
           if min(img["natural"]) <= 0 or min(img["shown"]) <= 0]
    assert not bad, "images not rendered (zero size):\n" + "\n".join(bad)


def test_executed_notebooks_show_their_plots(crawl):
    """A notebook page built from an executed copy carries its figures as images."""
    used = json.loads((SITE / "build.json").read_text())["notebooks"]
    executed = [n for n, how in used.items() if how == "executed"]
    bad = [n for n in executed if not crawl[f"notebooks/{n}.html"]["images"]]
    assert not bad, f"executed notebooks whose page has no image: {bad}"


def test_internal_links_resolve(crawl, server):
    """Every same-site link reaches a page or file; a #fragment names an element of its page."""
    bad, checked = [], {}
    for page, r in crawl.items():
        for href in r.get("links", []):
            if not href.startswith(server):
                continue
            url, _, frag = href.partition("#")
            path = urllib.parse.urlsplit(url).path[1:] or "index.html"
            path = urllib.parse.unquote(path)
            if path.endswith("/"):
                path += "index.html"
            if url not in checked:
                try:
                    with urllib.request.urlopen(url.split("?")[0], timeout=30) as resp:
                        checked[url] = resp.status
                except urllib.error.HTTPError as e:
                    checked[url] = e.code
            if checked[url] != 200:
                bad.append(f"{page}: {href} -> HTTP {checked[url]}")
            elif frag and path in crawl and urllib.parse.unquote(frag) not in crawl[path]["ids"]:
                bad.append(f"{page}: {href} -> no element with id {frag!r} in {path}")
    assert checked, "no internal link found at all"
    assert not bad, "broken internal links:\n" + "\n".join(sorted(set(bad)))


MATH = re.compile(r"\$\$.+?\$\$|(?<![\\$])\$[^\s$][^$\n]*?(?<![\s\\])\$", re.S)
CODE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$|`[^`\n]+`", re.S | re.M)


def _source_maths(page: str) -> int:
    """How many $...$ / $$...$$ formulas the page's source holds (outside code)."""
    stem = (SITE / "src" / page).with_suffix("")
    if stem.with_suffix(".md").exists():
        texts = [stem.with_suffix(".md").read_text(encoding="utf-8")]
    elif stem.with_suffix(".ipynb").exists():
        nb = nbformat.read(stem.with_suffix(".ipynb"), as_version=4)
        texts = [c.source for c in nb.cells if c.cell_type == "markdown"]
    else:
        return 0
    # HTML comments (a lesson's numbers block quotes maths too) are not rendered
    return sum(len(MATH.findall(CODE.sub("", re.sub(r"<!--.*?-->", "", t, flags=re.S)))) for t in texts)


def test_maths_is_typeset(crawl):
    """MathJax ran on every page with maths, typeset every formula without a TeX error, and no
    formula of the source was left as plain $...$ text."""
    bad = []
    for page, r in crawl.items():
        expected = _source_maths(page)
        if not r["mathjax"]:
            bad.append(f"{page}: has maths but MathJax did not load")
            continue
        if r["raw"] or r["merrors"]:
            bad.append(f"{page}: not typeset {r['raw'][:3]}, TeX errors {r['merrors'][:3]}")
        if r["typeset"] < expected:
            bad.append(f"{page}: {r['typeset']} formulas typeset, the source has {expected}")
    assert any(_source_maths(p) for p in crawl), "no page with maths: the check would be vacuous"
    assert not bad, "maths not typeset:\n" + "\n".join(bad)


def test_navigation_reaches_every_lesson_and_notebook(crawl, server):
    """The sidebar of every lesson and notebook page links to all of them."""
    course = {p for p in crawl if p.startswith(("lessons/", "notebooks/"))}
    bad = []
    for page in sorted(course | {"index.html"}):
        nav = {urllib.parse.urlsplit(h).path[1:] for h in crawl[page]["nav"]}
        if missing := sorted(course - nav - {page}):
            bad.append(f"{page}: sidebar lacks {missing}")
    assert course and not bad, "\n".join(bad)


def _builder():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_site", REPO / "scripts" / "build_site.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_maps_links_and_rejects_missing_files(tmp_path):
    """Code links become pages that show the file; a link to a file that is not there stops the
    build with the file and the link named (the browser test cannot see a link the build dropped)."""
    bs = _builder()
    site = bs.Site(tmp_path)
    out = site.rewrite("See [the loss](../dpo_lab/dpo/loss.py#L1) and [02](02_normalization.md).\n"
                       "```\n[not a link](../nowhere.py)\n```\n", "lessons/01_rlhf_to_dpo.md")
    assert "(../code/dpo_lab/dpo/loss.py.md#L1)" in out and "(02_normalization.md)" in out
    assert "[not a link](../nowhere.py)" in out
    assert (tmp_path / "code/dpo_lab/dpo/loss.py.md").exists() and (tmp_path / "dpo_lab/dpo/loss.py").exists()
    with pytest.raises(bs.LinkError, match=r"lessons/01_x\.md: link to '\.\./dpo_lab/nope\.py'"):
        site.rewrite("[gone](../dpo_lab/nope.py)", "lessons/01_x.md")


def test_build_opens_details_blocks_to_markdown(tmp_path):
    """Maths in a <details> answer, as the lessons' exercises write them, reaches the parser."""
    out = _builder().Site(tmp_path).rewrite(
        "3. Question $p$? <details><summary>Answer\n   </summary>$m > 63$: 64.</details>\n4. Next\n", "lessons/x.md")
    assert out == ("3. Question $p$? \n\n   <details><summary>Answer</summary>\n\n   $m > 63$: 64.\n\n"
                   "   </details>\n4. Next\n")
