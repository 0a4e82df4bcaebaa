"""The DPO run's configuration: YAML file + KEY=VALUE overrides -> a checked, typed TrainConfig.

    cfg = load_config("configs/dpo/tiny_cpu.yaml", ["train.max_steps=20", "dpo.beta=0.2"])

Every section is a pydantic dataclass: each value's type and range is checked when the config is
built (and on assignment or dataclasses.replace), so `dpo.beta=abc`, `train.lr=-1`,
`train.max_steps=2.5` or an unknown key is a ConfigError "<key>: <what is wrong> (got <value>)"
before any rank starts, never a traceback from inside a rank. Integers and booleans are strict (2.5
is not an int, 1 is not a bool); floats also accept numeric strings, because YAML 1.1 reads `1e-3`
as the string "1e-3".
"""
import ast
import difflib
import json
from dataclasses import asdict, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass

from dpo_lab.dpo.fdiv import F_DIVERGENCES, check_f_divergence
from dpo_lab.dpo.loss import LOSS_TYPES, SMOOTHED

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
Dtype = Literal[DTYPES]


class ConfigError(ValueError):
    """A config key that does not exist or a value that cannot work; raised before training."""


def _not_bool(v):
    if isinstance(v, bool):  # pydantic's lax float would take True as 1.0
        raise ValueError("must be a number, not a boolean")
    return v


def _loss_type(v):
    """One loss type or a non-empty list of them; an unknown name is listed with the valid ones."""
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names:
        raise ValueError("must be a loss type or a non-empty list of loss types")
    for name in names:
        if name not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {name!r}; valid: {', '.join(LOSS_TYPES)}")
    return v


Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]       # >= 1
Every = Annotated[int, Strict(), Field(ge=0)]       # 0 switches it off
Float = Annotated[float, BeforeValidator(_not_bool)]
Positive = Annotated[Float, Field(gt=0)]
Name = Annotated[str, Strict(), Field(min_length=1)]
LossType = Annotated[Name | list[Name], BeforeValidator(_loss_type)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
SECTION = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(config=SECTION)
class ModelConfig:
    name: Name = "tiny-sft"          # "tiny-sft" (the workbook's SFT model), a local dir or a HF name
    dtype: Dtype = "float32"         # dtype of the parameters that stay unquantised (norms, embeddings)
    gradient_checkpointing: Bool = False


@dataclass(config=SECTION)
class DataConfig:
    source: Name = "arith"           # shipped task, a .json/.jsonl/.parquet path or a HF dataset name
    split: Name = "train"
    eval_split: Name = "test"
    max_length: Annotated[int, Strict(), Field(ge=4)] = 64  # prompt + completion tokens
    max_rows: Every | None = None    # use only the first N training rows (None or 0: all)
    drop_invalid: Bool = False       # False: an invalid row stops the run with its index
    # Padding-free micro-batches (dpo_lab.dpo.packing): the 2B sequences end to end, position ids
    # restarting per sequence. Ours only: TRL 1.16's `padding_free` is switched off (it warns and pads).
    packing: Bool = True
    # packed row length (>= max_length). None (auto): max_length, first fit. Attention costs L² per
    # row, so one row of the whole micro-batch is slower than padding on CPU kernels; flash kernels
    # (GPU) read the rows as one varlen row anyway (packing.packed_inputs)
    max_tokens_per_row: Count | None = None


@dataclass(config=SECTION)
class QuantConfig:
    load_in_4bit: Bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: Bool = True
    compute_dtype: Dtype = "float32"
    storage_dtype: Literal[DTYPES + ("uint8",)] = "bfloat16"  # FSDP shards it; never cast


@dataclass(config=SECTION)
class LoraConfig:
    r: Count = 16
    alpha: Count = 32
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[Name], Field(min_length=1)] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    dtype: Dtype = "bfloat16"        # QLoRA keeps adapters in bf16 (as TRL does for 4-bit models)


@dataclass(config=SECTION)
class DPOConfig:
    beta: Positive = 0.1
    loss_type: LossType = "sigmoid"  # one of dpo_lab.dpo.loss.LOSS_TYPES, or a list of them to combine
    loss_weights: list[Annotated[Float, Field(allow_inf_nan=False)]] | None = None  # one per loss type; None: 1 each
    label_smoothing: Annotated[Float, Field(ge=0, lt=0.5)] = 0.0  # ε of sigmoid (cDPO), robust, exo_pair, aot*
    f_divergence_type: Literal[F_DIVERGENCES] = "reverse_kl"  # f-DPO's regulariser
    f_alpha_divergence_coef: Fraction = 0.5                    # α of alpha_divergence (TRL's)
    ld_alpha: Fraction | None = None  # LD-DPO weight of the longer completion's extra tokens; None: DPO
    discopop_tau: Positive = 0.05
    # The plain path computes the reference log-probs in each step. precompute_ref: all of the run's
    # micro-batches before step 1, kept in memory; ref_cache (implies it): also kept on disk and
    # reused by any later run that scores the very same micro-batch (dpo_lab/dpo/ref_cache.py), so
    # reuse is bitwise equal to the plain path; both false: the plain path.
    precompute_ref: Bool = False
    ref_cache: Bool = True
    ref_cache_dir: Name | None = None  # None: $DPO_LAB_CACHE (dpo_lab.paths.cache_dir()); under it ref_logps/
    # Log-probs from the completion positions' hidden states through the LM head in chunks
    # (dpo_lab.dpo.logprobs), never the [2B, T, V] fp32 logits; false: full logits (the reference).
    # Ours only: TRL's counterpart, `use_liger_kernel`, needs the liger-kernel package.
    chunked_logps: Bool = True
    logps_chunk_size: Count = 256    # tokens per chunk: chunk × vocab fp32 logits at a time


@dataclass(config=SECTION)
class OptimConfig:
    lr: Positive = 5e-4
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    warmup_ratio: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    schedule: Literal[SCHEDULES] = "cosine"
    max_steps: Count | None = 40     # optimizer steps; None: run `epochs` over the data
    epochs: Positive = 1.0
    micro_batch: Count = 8           # pairs per rank per forward
    grad_accum: Count = 1
    max_grad_norm: Positive = 1.0
    seed: Annotated[int, Strict(), Field(ge=0)] = 0
    # lora: a frozen base (4-bit with quant.load_in_4bit) + LoRA adapters, the reference = adapters
    # off. full: every parameter trainable in model.dtype (never 4-bit), AdamW over all of them; no
    # adapters to switch off, so the reference log-probs come from the cache computed before step 1
    # (dpo.ref_cache or dpo.precompute_ref) and the lora section is unused.
    finetune: Literal["lora", "full"] = "lora"


@dataclass(config=SECTION)
class FSDPConfig:
    reshard_after_forward: Bool = True   # ZeRO-3 style; False keeps layers gathered until backward
    param_dtype: Dtype | None = None     # mixed precision compute dtype; None: keep each param's dtype
    reduce_dtype: Dtype | None = "float32"
    cpu_offload: Bool = False


@dataclass(config=SECTION)
class CheckpointConfig:
    every: Every = 0                 # save every N steps (0: only at the end)
    keep: Every = 2                  # checkpoints kept (0: all)
    resume: Bool = True              # continue from the last complete checkpoint in output_dir
    # DCP async_save: copy the state to CPU memory, write it in a background thread while training
    # goes on; the checkpoint is completed once every rank has written (dpo_lab.dpo.checkpoint)
    async_save: Bool = False


@dataclass(config=SECTION)
class EvalConfig:
    every: Every = 0                 # held-out preference accuracy every N steps (0: end only)
    max_rows: Every | None = 200     # None or 0: every held-out row
    batch: Count = 32


@dataclass(config=SECTION)
class DebugConfig:
    crash_at_step: Every | None = None       # os._exit(1) on every rank right after this step (tests)
    crash_while_saving: Every | None = None  # die halfway through writing this step's checkpoint
    stop_after: Count | None = None          # end cleanly after this step (the schedule still spans max_steps)


@dataclass(config=SECTION)
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
    output_dir: Name = "build/runs/dpo"
    log_every: Count = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# TRL / transformers names people type out of habit -> ours.
ALIASES = {"learning_rate": "lr", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "per_device_train_batch_size": "micro_batch", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "warmup_steps": "warmup_ratio", "lr_scheduler_type": "schedule",
           "finetuning_type": "finetune"}  # LLaMA-Factory's name


def _unknown(key, value, valid, where):
    close = [ALIASES[key]] if ALIASES.get(key) in valid else difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {where}{close[0]}?" if close else f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"{where}{key}: unknown config key; {hint} (got {value!r})")


def _sections(cls) -> dict:
    """{key: section class or None} for the keys of one section."""
    return {f.name: f.type if is_dataclass(f.type) else None for f in fields(cls)}


def _check_keys(cls, data, where: str = "") -> None:
    """Unknown keys first, with a spelling hint (pydantic would only say 'unexpected')."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where[:-1] or 'config'}: must be a mapping of keys to values (got {data!r})")
    valid = _sections(cls)
    for key, value in data.items():
        if key not in valid:
            raise _unknown(key, value, list(valid), where)
        if valid[key] is not None:
            _check_keys(valid[key], value, f"{where}{key}.")


def _field_names(cls) -> set:
    names = set()
    for name, sub in _sections(cls).items():
        names |= {name} | (_field_names(sub) if sub else set())
    return names


PLAIN = {"float_parsing": "must be a number", "float_type": "must be a number",
         "int_type": "must be an integer", "int_parsing": "must be an integer",
         "int_from_float": "must be an integer", "bool_type": "must be true or false",
         "bool_parsing": "must be true or false", "string_type": "must be a string",
         "list_type": "must be a list", "string_too_short": "must not be empty",
         "too_short": "must not be empty"}


def _as_config_error(e: ValidationError) -> ConfigError:
    """pydantic's first complaint as '<key>: <what is wrong> (got <value>)'."""
    err, names = e.errors()[0], _field_names(TrainConfig)
    key = ""
    for part in err["loc"]:  # skip pydantic's union-branch labels such as 'int' or "literal[...]"
        if isinstance(part, int):
            key += f"[{part}]"
        elif part in names:
            key += f".{part}" if key else part
    msg = PLAIN.get(err["type"]) or err["msg"].replace("Value error, ", "").replace("Input should be", "must be")
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return ConfigError(f"{key or 'config'}: {msg} (got {err['input']!r}){more}")


def _build(data: dict) -> "TrainConfig":
    _check_keys(TrainConfig, data)
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        raise _as_config_error(e) from None


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
            raise ConfigError(f"{path}: {k} is not a section (got {node!r})")
    node[keys[-1]] = value


def apply_override(data: dict, item: str) -> None:
    """'train.lr=1e-4' on the command line -> set_key(data, 'train.lr', 0.0001)."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like section.key=value (got {item!r})")
    path, value = item.split("=", 1)
    set_key(data, path, _parse_value(value.strip()))


def _check_losses(d: DPOConfig) -> None:
    """The loss settings that only make sense together."""
    types = [d.loss_type] if isinstance(d.loss_type, str) else d.loss_type
    if d.loss_weights is not None and len(d.loss_weights) != len(types):
        raise ConfigError(f"dpo.loss_weights: {len(d.loss_weights)} weights for {len(types)} loss types "
                          f"{types} (got {d.loss_weights!r})")
    try:
        check_f_divergence(d.f_divergence_type, d.f_alpha_divergence_coef, types)
    except ValueError as e:
        raise ConfigError(f"dpo.f_divergence_type: {e} (got {d.f_divergence_type!r})") from None
    if "exo_pair" in types and d.label_smoothing == 0:
        raise ConfigError("dpo.label_smoothing: must be > 0 with loss type exo_pair (the EXO paper uses 1e-3) "
                          "(got 0.0)")
    if d.label_smoothing > 0 and not set(types) & set(SMOOTHED):  # would be silently ignored
        raise ConfigError(f"dpo.label_smoothing: none of the loss types {types} reads it (only "
                          f"{', '.join(SMOOTHED)} do) (got {d.label_smoothing!r})")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks across keys (each key's own type and range were checked when it was built)."""
    from dpo_lab.data import local_path
    q = cfg.quant
    if cfg.train.finetune == "full":
        # 4-bit weights cannot be trained (bitsandbytes' Params4bit has no gradient); loading them
        # unquantised behind the user's back would hide a 4x larger model, so say it.
        if q.load_in_4bit:
            raise ConfigError("quant.load_in_4bit: must be false with train.finetune=full (4-bit weights "
                              "are frozen; full fine-tuning trains them in model.dtype) (got True)")
        # the reference is the initial model: without adapters to switch off, it exists only as
        # log-probs computed before the first update
        if not (cfg.dpo.ref_cache or cfg.dpo.precompute_ref):
            raise ConfigError("dpo.ref_cache: train.finetune=full needs the reference log-probs computed "
                              "before step 1: set dpo.ref_cache=true or dpo.precompute_ref=true (got False)")
    if q.storage_dtype == "uint8" and q.load_in_4bit:
        raise ConfigError("quant.storage_dtype: uint8 cannot be sharded by FSDP (it shards floating "
                          "tensors only) (got 'uint8')")
    # bitsandbytes casts a layer's bias to the compute dtype in place, inside forward; under FSDP
    # that would rewrite a gathered parameter, so the unquantised weights must already match.
    if q.load_in_4bit and q.compute_dtype != cfg.model.dtype:
        raise ConfigError(f"quant.compute_dtype: must equal model.dtype={cfg.model.dtype!r} "
                          f"(bitsandbytes casts biases in place) (got {q.compute_dtype!r})")
    # FSDP would cast the packed 4-bit bytes to param_dtype and turn them into garbage.
    if q.load_in_4bit and cfg.fsdp.param_dtype not in (None, q.storage_dtype):
        raise ConfigError(f"fsdp.param_dtype: differs from quant.storage_dtype={q.storage_dtype!r}, so FSDP "
                          f"would cast the packed 4-bit weights; set them equal or leave it null "
                          f"(got {cfg.fsdp.param_dtype!r})")
    _check_losses(cfg.dpo)
    d = cfg.data  # a sequence is never split across packed rows, so every one must fit a row
    if d.packing and d.max_tokens_per_row is not None and d.max_tokens_per_row < d.max_length:
        raise ConfigError(f"data.max_tokens_per_row: must be >= data.max_length={d.max_length} (a packed "
                          f"sequence is never split) (got {d.max_tokens_per_row!r})")
    try:  # a missing local data file is named now, not after the model is built
        local_path(cfg.data.source)
    except OSError as e:
        raise ConfigError(f"data.source: {e} (got {cfg.data.source!r})") from None
    return cfg


def load_config(path=None, overrides=(), updates: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- `updates` {"section.key": value} <- overrides ("section.key=value")."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists()
                              else f"config file {path} is not a file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path}: not valid UTF-8 YAML: {e}".replace("\n", " ")) from None
    for k, v in (updates or {}).items():
        set_key(data, k, v)
    for item in overrides:
        apply_override(data, item)
    return validate(_build(data))


def from_dict(data: dict) -> TrainConfig:
    return validate(_build(data))
