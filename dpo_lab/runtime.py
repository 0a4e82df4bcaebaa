"""Seeding, profiles and devices: what every notebook's first real cell calls."""
import os
import random

import numpy as np
import torch

from dpo_lab.paths import build_dir

PROFILES = ("smoke", "full")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(profile: str, seed: int, output_dir=None):
    """Check the papermill parameters, seed everything, and return the resolved output dir."""
    if profile not in PROFILES:
        raise ValueError(f"PROFILE must be one of {PROFILES}, got {profile!r}")
    if not isinstance(seed, int):
        raise TypeError(f"SEED must be an int, got {seed!r}")
    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = build_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pick(profile: str, **choices):
    """pick(PROFILE, smoke=..., full=...): the value for this profile, with a clear error."""
    if profile not in choices:
        raise KeyError(f"no setting for profile {profile!r}; have {sorted(choices)}")
    return choices[profile]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
