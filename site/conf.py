"""Sphinx configuration of the course site; `make site` (scripts/build_site.py) builds it."""
project = "dpo-lab"
author = "dpo-lab"
copyright = "dpo-lab contributors"

extensions = [
    "myst_nb",  # Markdown lessons (MyST) and notebooks with their stored outputs
    "sphinx-mathjax-offline",  # MathJax 3 served from _static/: the maths is typeset without a CDN
]
# An unknown macro is then a TeX error (mjx-merror, which the browser test looks for), not red text.
mathjax3_config = {"tex": {"packages": {"[-]": ["noundefined"]}}}
myst_enable_extensions = ["dollarmath"]  # the lessons write maths as $...$ and $$...$$
myst_heading_anchors = 3  # #section links within and across pages
nb_execution_mode = "off"  # the notebooks were executed by `dpo-lab run`; never run them here
nb_ipywidgets_js = {}  # no widget JS from a CDN: widget outputs are dropped by build_site.py

html_theme = "sphinx_book_theme"
html_title = "dpo-lab"
html_theme_options = {
    "show_navbar_depth": 1,
    "use_download_button": True,
    "show_toc_level": 2,
}
# pydata-sphinx-theme's light/dark switch logs a console error when no default mode is given.
html_context = {"default_mode": "auto"}
html_favicon = "_static/favicon.svg"  # else browsers ask for /favicon.ico, a 404 on every page
exclude_patterns = ["_build"]
