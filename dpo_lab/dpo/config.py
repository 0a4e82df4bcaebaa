"""The DPO run's configuration: YAML file + KEY=VALUE overrides -> a checked, typed TrainConfig.

    cfg = load_config("configs/dpo/tiny_cpu.yaml", ["train.max_steps=20", "dpo.beta=0.2"])

Every section is a dataclass, so a key that does not exist is an error naming the key (with the
closest valid spelling) before any rank starts, rather than a silently ignored typo.
"""
import ast
import difflib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

DTYPES = ("float32", "bfloat16", "float16")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config key that does not exist or a value that cannot work; raised before training."""


@dataclass
class ModelConfig:
    name: str = "tiny-sft"          # "tiny-sft" (the workbook's SFT model), a local dir or a HF name
    dtype: str = "float32"          # dtype of the parameters that stay unquantised (norms, embeddings)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    source: str = "arith"           # shipped task, a .json/.jsonl/.parquet path or a HF dataset name
    split: str = "train"
    eval_split: str = "test"
    max_length: int = 64            # prompt + completion tokens
    max_rows: int | None = None     # use only the first N training rows
    drop_invalid: bool = False      # False: an invalid row stops the run with its index


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    storage_dtype: str = "bfloat16"  # the float container FSDP shards; must never be cast


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    dtype: str = "bfloat16"         # QLoRA keeps adapters in bf16 (as TRL does for 4-bit models)


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False    # True: reference log-probs for every planned batch before step 1


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_steps: int | None = 40      # optimizer steps; None: run `epochs` over the data
    epochs: float = 1.0
    micro_batch: int = 8            # pairs per rank per forward
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True   # ZeRO-3 style; False keeps layers gathered until backward
    param_dtype: str | None = None       # mixed precision compute dtype; None: keep each param's dtype
    reduce_dtype: str | None = "float32"
    cpu_offload: bool = False


@dataclass
class CheckpointConfig:
    every: int = 0                  # save every N steps (0: only at the end)
    keep: int = 2
    resume: bool = True             # continue from the last complete checkpoint in output_dir


@dataclass
class EvalConfig:
    every: int = 0                  # held-out preference accuracy every N steps (0: end only)
    max_rows: int | None = 200
    batch: int = 32


@dataclass
class DebugConfig:
    crash_at_step: int | None = None      # os._exit(1) on every rank right after this step (tests)
    crash_while_saving: int | None = None  # die halfway through writing this step's checkpoint
    stop_after: int | None = None       # end cleanly after this step (the schedule still spans max_steps)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    output_dir: str = "build/runs/dpo"
    log_every: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# TRL / transformers names people type out of habit -> ours.
ALIASES = {"learning_rate": "lr", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "per_device_train_batch_size": "micro_batch", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "warmup_steps": "warmup_ratio", "lr_scheduler_type": "schedule"}


def _unknown(key, valid, where):
    close = [ALIASES[key]] if ALIASES.get(key) in valid else difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {where}{key}{hint}; valid keys here: {', '.join(valid)}")


def _build(cls, data: dict, where: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or 'root'} must be a mapping, got {data!r}")
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(key, names, where)
        default = getattr(cls(), key)
        kwargs[key] = _build(type(default), value, f"{where}{key}.") if is_dataclass(default) else value
    return cls(**kwargs)


def _parse_value(text: str):
    if text.lower() in ("null", "none"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(data: dict, path: str, value) -> None:
    """set_key(d, "train.lr", 1e-4) sets d["train"]["lr"] (sections are created as needed)."""
    keys = path.strip().split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {path!r}: {k!r} is not a section")
    node[keys[-1]] = value


def apply_override(data: dict, item: str) -> None:
    """'train.lr=1e-4' on the command line -> set_key(data, 'train.lr', 0.0001)."""
    if "=" not in item:
        raise ConfigError(f"override must look like section.key=value, got {item!r}")
    path, value = item.split("=", 1)
    set_key(data, path, _parse_value(value.strip()))


def validate(cfg: TrainConfig) -> TrainConfig:
    checks = [
        (cfg.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}"),
        (cfg.quant.compute_dtype in DTYPES, f"quant.compute_dtype must be one of {DTYPES}"),
        (cfg.quant.storage_dtype in DTYPES + ("uint8",), "quant.storage_dtype must be a float dtype"),
        (cfg.quant.storage_dtype != "uint8" or not cfg.quant.load_in_4bit,
         "quant.storage_dtype=uint8 cannot be sharded by FSDP (it shards floating tensors only)"),
        (cfg.quant.quant_type in ("nf4", "fp4"), "quant.quant_type must be nf4 or fp4"),
        (cfg.lora.dtype in DTYPES, f"lora.dtype must be one of {DTYPES}"),
        (cfg.lora.r > 0 and cfg.lora.alpha > 0, "lora.r and lora.alpha must be positive"),
        (cfg.dpo.loss_type in LOSS_TYPES, f"dpo.loss_type must be one of {LOSS_TYPES}, "
                                          f"got {cfg.dpo.loss_type!r}"),
        (cfg.dpo.beta > 0, f"dpo.beta must be > 0, got {cfg.dpo.beta}"),
        (0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
        (cfg.train.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}"),
        (cfg.train.micro_batch >= 1 and cfg.train.grad_accum >= 1,
         "train.micro_batch and train.grad_accum must be >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (cfg.data.max_length >= 4, "data.max_length must be >= 4"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    # bitsandbytes casts a layer's bias to the compute dtype in place, inside forward; under FSDP
    # that would rewrite a gathered parameter, so the unquantised weights must already match.
    if cfg.quant.load_in_4bit and cfg.quant.compute_dtype != cfg.model.dtype:
        raise ConfigError(f"quant.compute_dtype={cfg.quant.compute_dtype!r} must equal "
                          f"model.dtype={cfg.model.dtype!r} (bitsandbytes casts biases in place)")
    # FSDP would cast the packed 4-bit bytes to param_dtype and turn them into garbage.
    if cfg.quant.load_in_4bit and cfg.fsdp.param_dtype not in (None, cfg.quant.storage_dtype):
        raise ConfigError(f"fsdp.param_dtype={cfg.fsdp.param_dtype!r} differs from "
                          f"quant.storage_dtype={cfg.quant.storage_dtype!r}: FSDP would cast the packed "
                          f"4-bit weights; set them equal or leave fsdp.param_dtype null")
    return cfg


def load_config(path=None, overrides=(), updates: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- `updates` {"section.key": value} <- overrides ("section.key=value")."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for k, v in (updates or {}).items():
        set_key(data, k, v)
    for item in overrides:
        apply_override(data, item)
    return validate(_build(TrainConfig, data))


def from_dict(data: dict) -> TrainConfig:
    return validate(_build(TrainConfig, data))
