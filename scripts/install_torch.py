"""Install torch into the environment of the Python running this script, as the right build.

    .venv/bin/python scripts/install_torch.py 2.13.0

- A torch already installed at or above the floor in pyproject.toml is kept (CI pre-installs
  one; so can you, e.g. a ROCm or nightly build).
- Linux without an NVIDIA GPU: the CPU build from PyTorch's CPU index, because PyPI's Linux torch
  is a CUDA build that brings several GB of nvidia-* wheels. When that index cannot be reached
  within a few seconds, the default index (PyPI, or whatever pip is configured with).
- Otherwise (NVIDIA GPU, macOS, Windows): the default index, which serves the CUDA build on Linux
  and the CPU/MPS build elsewhere.
Standard library only: it runs before anything else is installed.
"""
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from importlib import metadata
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_SECONDS = 4.0


def release(version):
    """(2, 13, 0) from '2.13.0+cpu' or '2.6.0a0+git1234': compare numbers, not strings."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def torch_floor(pyproject):
    """The X of `"torch>=X"` in pyproject.toml."""
    found = re.search(r'"torch>=([\d.]+)"', Path(pyproject).read_text())
    if not found:
        sys.exit(f'{pyproject}: no "torch>=X" dependency')
    return found.group(1)


def has_nvidia_gpu():
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def reachable(url, seconds=PROBE_SECONDS):
    """True when `url` answers within about `seconds`. The thread bounds the DNS lookup too,
    which urlopen's timeout does not cover; it is a daemon, so a hung lookup cannot block exit."""
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=seconds)
            answered.append(True)
        except Exception:  # any failure (DNS, refused, TLS, HTTP error) means: don't use it
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds + 1)
    return bool(answered)


def pip_args(version, installed, floor, system, gpu, cpu_index_reachable):
    """The `pip install` arguments for torch, or None to keep the installed one.
    `cpu_index_reachable` is called only when the CPU index would be used."""
    if installed is not None and release(installed) >= release(floor):
        return None
    args = [f"torch=={version}"]
    if system == "linux" and not gpu:
        if cpu_index_reachable():
            args += ["--index-url", CPU_INDEX]
        else:
            print(f"install_torch: {CPU_INDEX} unreachable; installing torch from the default "
                  "index (on Linux that can be a CUDA build of several GB)", file=sys.stderr)
    return args


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/install_torch.py VERSION")
    version = sys.argv[1]
    floor = torch_floor(Path(__file__).resolve().parent.parent / "pyproject.toml")
    try:
        installed = metadata.version("torch")
    except metadata.PackageNotFoundError:
        installed = None
    args = pip_args(version, installed, floor, sys.platform, has_nvidia_gpu(),
                    lambda: reachable(f"{CPU_INDEX}/torch/"))
    if args is None:
        print(f"install_torch: keeping the installed torch {installed} (>= {floor})")
        return
    print("install_torch: pip install " + " ".join(args))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)
    print("install_torch: installed torch " + metadata.version("torch"))


if __name__ == "__main__":
    main()
