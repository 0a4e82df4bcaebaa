"""The install path of the README (`make run`, `make test`), checked offline: the lock and its
relation to pyproject.toml, and scripts/install_torch.py's choice of torch build."""
import http.server
import importlib.util
import re
import socket
import sys
import threading
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
CUDA_ONLY = re.compile(r"(torch|triton|nvidia-.*|cuda-.*)")


def lock_entries():
    """[(line number, Requirement)] of the lock's requirement lines."""
    entries = []
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            entries.append((number, Requirement(text)))
    return entries


def project_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def torch_requirement():
    return next(r for r in project_requirements() if r.name == "torch")


def makefile_torch_version():
    return re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_lock_pins_exact_versions():
    entries = lock_entries()
    assert len(entries) > 50, f"{LOCK}: only {len(entries)} requirement lines"
    for number, req in entries:
        specs = list(req.specifier)
        where = f"lock.txt:{number}: {req}"
        assert len(specs) == 1 and specs[0].operator == "==", f"{where}: not an exact == pin"
        assert "*" not in specs[0].version and "+" not in specs[0].version, \
            f"{where}: a wildcard or local (+cuXXX) version"


def test_lock_has_no_torch_or_cuda_wheels():
    # torch comes from scripts/install_torch.py; a pin here could replace a CPU build with PyPI's CUDA one
    bad = [f"lock.txt:{n}: {r}" for n, r in lock_entries() if CUDA_ONLY.fullmatch(r.name.lower())]
    assert not bad, f"torch or CUDA wheels in the lock: {bad}"


def test_every_dependency_is_locked_within_its_range():
    locked = {}
    for number, req in lock_entries():
        locked.setdefault(canonicalize_name(req.name), []).append((number, req))
    for dep in project_requirements():
        if dep.name == "torch":
            continue
        pins = locked.get(canonicalize_name(dep.name))
        assert pins, f"pyproject.toml dependency {dep} is not in {LOCK.name}: run `make lock`"
        for number, pin in pins:
            version = Version(next(iter(pin.specifier)).version)
            assert dep.specifier.contains(version, prereleases=True), \
                f"lock.txt:{number}: {pin} is outside pyproject.toml's range {dep}"


def test_torch_version_in_step():
    """The Makefile's TORCH_VERSION is within pyproject's range, is the torch the lock was resolved
    with, and is what CI pre-installs; conda's floor is pyproject's."""
    version = makefile_torch_version()
    torch = torch_requirement()
    assert torch.specifier.contains(version), f"Makefile TORCH_VERSION {version} outside {torch}"
    resolved = re.search(r"^# torch==(\S+)$", LOCK.read_text(), re.M)
    assert resolved and resolved.group(1) == version, \
        f"{LOCK.name} was resolved with {resolved and resolved.group(0)}, Makefile has {version}: run `make lock`"
    ci = re.search(r"pip install --quiet torch==(\S+)", (ROOT / ".ci" / "run").read_text())
    assert ci and ci.group(1) == version, f".ci/run pre-installs {ci and ci.group(0)}, Makefile has {version}"
    conda = re.search(r"^\s*- pytorch(\S*)$", (ROOT / "environment.yml").read_text(), re.M)
    assert conda and conda.group(1) == str(torch.specifier), \
        f"environment.yml has pytorch{conda and conda.group(1)}, pyproject.toml has {torch}"


# --- scripts/install_torch.py ---------------------------------------------------------------

@pytest.fixture(scope="module")
def it():
    spec = importlib.util.spec_from_file_location("install_torch", ROOT / "scripts" / "install_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def never(): raise AssertionError("probed the CPU index where it must not be used")


def test_kept_when_installed_torch_is_new_enough(it):
    # numeric, not string comparison: "2.13" < "2.6" as strings
    assert it.pip_args("2.13.0", "2.13.0+cpu", "2.6", "linux", False, never) is None
    assert it.pip_args("2.13.0", "2.10.0.dev20250101+rocm6.3", "2.6", "linux", False, never) is None
    assert it.pip_args("2.13.0", "2.5.1", "2.6", "darwin", False, never) == ["torch==2.13.0"]


def test_cpu_index_on_linux_without_gpu(it):
    args = it.pip_args("2.13.0", None, "2.6", "linux", False, lambda: True)
    assert args == ["torch==2.13.0", "--index-url", it.CPU_INDEX]


def test_default_index_when_cpu_index_unreachable(it):
    assert it.pip_args("2.13.0", None, "2.6", "linux", False, lambda: False) == ["torch==2.13.0"]


def test_default_index_with_gpu_or_off_linux(it):
    # PyPI's torch is the CUDA build on Linux, CPU/MPS on macOS and Windows: no probe needed
    for system, gpu in [("linux", True), ("darwin", False), ("win32", False), ("win32", True)]:
        assert it.pip_args("2.13.0", None, "2.6", system, gpu, never) == ["torch==2.13.0"]


def test_floor_read_from_pyproject(it):
    assert it.torch_floor(ROOT / "pyproject.toml") == str(torch_requirement().specifier)[2:]


class _Head(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_probe_answers(it):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert it.reachable(f"http://127.0.0.1:{server.server_port}/whl/cpu/torch/", seconds=30)
    finally:
        server.shutdown()
        server.server_close()


def test_probe_gives_up_on_refused_and_silent_servers(it):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        assert not it.reachable(f"http://127.0.0.1:{port}/", seconds=5)
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        result = []
        probe = threading.Thread(target=lambda: result.append(it.reachable(url, seconds=0.5)),
                                 daemon=True)
        probe.start()
        probe.join(120)  # hang guard only
        assert result == [False], "the probe of a server that never answers did not give up"
