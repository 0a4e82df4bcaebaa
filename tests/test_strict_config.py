"""Every range and type rule of the config, at its boundary: the last bad value is refused with
the key named and the first good value is accepted, so a `lt` that became `le` (or a bound that
was dropped or a strict int made lax) shows up. The table is written out by hand from the
meaning of each key, not derived from the config classes."""
import pytest

from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
EPS = 1e-9

COUNTS = ["lora.r", "lora.alpha", "train.micro_batch", "train.grad_accum", "train.max_steps",
          "eval.batch", "log_every", "debug.stop_after"]            # >= 1
SWITCHES = ["data.max_rows", "checkpoint.every", "checkpoint.keep", "eval.every", "eval.max_rows",
            "debug.crash_at_step", "debug.crash_while_saving"]      # >= 0, 0 switches it off
# key: (values refused, values accepted)
RANGES = {
    **{k: ([0, -1], [1]) for k in COUNTS},
    **{k: ([-1], [0]) for k in SWITCHES},
    "data.max_length": ([3], [4]),               # prompt + completion need a few tokens
    "train.seed": ([-1], [0]),
    "dpo.beta": ([0.0, -EPS], [EPS]),
    "train.lr": ([0.0, -EPS], [EPS]),
    "train.epochs": ([0.0], [EPS]),
    "train.max_grad_norm": ([0.0], [EPS]),
    "train.weight_decay": ([-EPS], [0.0]),
    "train.warmup_ratio": ([1.0, -EPS], [0.0, 1 - EPS]),   # 1: no step after the warm-up
    "lora.dropout": ([1.0, -EPS], [0.0, 1 - EPS]),
    "dpo.label_smoothing": ([0.5, -EPS], [0.0, 0.5 - EPS]),  # robust DPO divides by 1 − 2ε
    "dpo.f_alpha_divergence_coef": ([-EPS, 1 + EPS], [0.0, 1.0]),  # forward KL .. reverse KL
    "dpo.ld_alpha": ([-EPS, 1 + EPS], [0.0, 1.0]),  # LD-DPO: tail dropped .. plain DPO
    "dpo.discopop_tau": ([0.0, -EPS], [EPS]),       # DiscoPOP divides by τ
}
INTS = ["data.max_length", "train.seed", *COUNTS, *SWITCHES]
FLOATS = ["dpo.beta", "train.lr", "train.epochs", "train.max_grad_norm", "train.weight_decay",
          "train.warmup_ratio", "lora.dropout", "dpo.label_smoothing", "dpo.f_alpha_divergence_coef",
          "dpo.ld_alpha", "dpo.discopop_tau"]
BOOLS = ["model.gradient_checkpointing", "data.drop_invalid", "quant.load_in_4bit", "quant.double_quant",
         "dpo.precompute_ref", "dpo.ref_cache", "fsdp.reshard_after_forward", "fsdp.cpu_offload", "checkpoint.resume"]


def _get(cfg, key):
    node = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def _refused(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, updates={key: value})
    assert str(e.value).startswith(f"{key}: ") and f"(got {value!r})" in str(e.value), str(e.value)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_range_boundaries(key):
    bad, good = RANGES[key]
    for value in bad:
        _refused(key, value)
    for value in good:
        assert _get(load_config(TINY, updates={key: value}), key) == value


@pytest.mark.parametrize("key", INTS)
def test_ints_are_strict(key):
    for value in (True, 2.0, "2"):  # lax pydantic would take all three as an int
        _refused(key, value)


@pytest.mark.parametrize("key", FLOATS)
def test_floats_refuse_booleans_but_read_yaml_strings(key):
    _refused(key, True)
    value = "1e-1" if key != "train.weight_decay" else "0"
    got = _get(load_config(TINY, updates={key: value}), key)
    assert got == float(value) and isinstance(got, float)


@pytest.mark.parametrize("key", BOOLS)
def test_bools_are_strict(key):
    for value in (1, 0, "true"):
        _refused(key, value)
