"""Seeding, profiles and devices: what every notebook's first real cell calls."""
import contextlib
import logging
import os
import random
import sys
import tempfile
import warnings

import numpy as np
import torch

from dpo_lab.paths import build_dir

PROFILES = ("smoke", "full")


# --- third-party noise we cannot fix at its cause ------------------------------------------------
# Each one silenced by its exact message and its logger or category+module, so that anything else
# from the same library still shows. Installed when dpo_lab is imported: in the notebook kernel
# and in every rank (ranks import dpo_lab, not the notebook's setup()).

class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


_BNB_KERNELS = _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_known_noise() -> None:
    """Idempotent: install the narrow filters below."""
    # bitsandbytes 0.50, CPUs with AVX512-BF16: logged when bitsandbytes is imported, because the
    # optional `kernels` package (which would download a kernel from the Hub) is missing. dpo_lab
    # never runs that bf16 kernel (dpo_lab.dpo.qlora.one_kernel_path switches it off).
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _BNB_KERNELS not in bnb_log.filters:
        bnb_log.addFilter(_BNB_KERNELS)
    # transformers 5 renamed `is_gradient_checkpointing` to `is_activation_checkpointing`; PEFT 0.21
    # (PeftModel.__init__, i.e. get_peft_model) and TRL 1.16 (its trainers' loss) still read the
    # old name. Our own code uses the new names where they exist.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers\.modeling_utils")
    # torch 2.13's own torch/utils/mkldnn.py still decorates with torch.jit.script_method, and
    # bitsandbytes 0.50 imports it (through torch.compile -> inductor) when it is imported.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                            category=DeprecationWarning, module=r"torch\.jit\._script")


quiet_known_noise()


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


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to a scratch file for a while: C++ code that writes there directly
    (torch's profiler start/stop lines, bitsandbytes' import message) would show in a notebook."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
