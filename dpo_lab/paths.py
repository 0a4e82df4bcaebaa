"""Where things live: the repository, its data, and what runs write (build/)."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
LESSON_DIR = REPO_ROOT / "lessons"
CONFIG_DIR = REPO_ROOT / "configs"


def build_dir(output_dir=None) -> Path:
    """The root that runs write under: OUTPUT_DIR if given, else $DPO_LAB_BUILD, else <repo>/build."""
    if output_dir is None:
        output_dir = os.environ.get("DPO_LAB_BUILD", REPO_ROOT / "build")
    return Path(output_dir).resolve()


def cache_dir() -> Path:
    """Trained tiny models and other reusable artefacts ($DPO_LAB_CACHE or <repo>/build/cache)."""
    return Path(os.environ.get("DPO_LAB_CACHE", build_dir() / "cache")).resolve()
