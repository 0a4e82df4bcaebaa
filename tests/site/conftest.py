"""The course site's browser test runs only when this folder is named: `make site-test` runs
`pytest tests/site`; a plain `pytest` (testpaths = tests, as in `make test`) leaves it out, since it
needs a built site and Chromium."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _named(arg: str) -> bool:
    path = Path(arg.split("::")[0]).resolve()
    return path == HERE or HERE in path.parents


def pytest_ignore_collect(collection_path, config):
    if HERE == Path(collection_path).resolve() or HERE in Path(collection_path).resolve().parents:
        return None if any(_named(a) for a in config.args) else True
    return None
