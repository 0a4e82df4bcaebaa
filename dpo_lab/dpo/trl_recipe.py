"""The same DPO run with TRL's DPOTrainer + PEFT + 4-bit loading, for TRL users.

    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml \\
        -m dpo_lab.dpo.trl_recipe --config configs/dpo/llama3_8b_2gpu.yaml
    python -m dpo_lab.dpo.trl_recipe --config configs/dpo/tiny_cpu.yaml    # CPU, one process

It reads the same YAML as dpo_lab's trainer and fixes the traps of widely copied scripts:
- no `.to(device)` / `device_map="auto"` on a 4-bit model under FSDP or DeepSpeed: the
  quantisation config and accelerate place it (one GPU per process without them);
- `bnb_4bit_quant_storage` equals the dtype of the unquantised weights, so FSDP flattens one
  dtype and never casts the packed 4-bit bytes;
- the reference is the base with the adapter disabled: pass `peft_config` and no `ref_model`
  (loading a second 4-bit copy "as reference", or a PeftModel whose adapter is then copied into
  a "ref" adapter, is what many scripts do by accident);
- current argument names: `processing_class` (not `tokenizer`), `loss_type` as a list,
  `warmup_steps` as a fraction (transformers 5 removed `warmup_ratio`), `dtype` (not `torch_dtype`);
- reentrant gradient checkpointing with QLoRA.
On CPU, accelerate cannot run FSDP (it silently falls back to DDP), so the CPU path is a
single process; the dpo_lab trainer is the one that shards on CPUs.
"""
import argparse
import dataclasses
import os
import sys

import torch

from dpo_lab.dpo.config import ConfigError, TrainConfig, load_config
from dpo_lab.dpo.qlora import DTYPE, bnb_config, resolve_model


def load_policy(cfg: TrainConfig):
    """The 4-bit base through dpo_lab's one loader (same kernel path as our trainer's)."""
    from dpo_lab.models import load_model
    kwargs = {}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available() and not distributed:
        kwargs["device_map"] = {"": 0}  # one process, one GPU: let bitsandbytes place the weights
    model, tok = load_model(resolve_model(cfg.model.name), dtype=DTYPE[cfg.model.dtype],
                            quantization_config=bnb_config(cfg.quant), **kwargs)
    model.config.use_cache = False
    return model, tok


def checkpointing_args(enabled: bool, kwargs: dict | None = None) -> dict:
    """Activation checkpointing as TrainingArguments fields, under the name this transformers reads:
    5.x renamed `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]` and warns
    when only the old name is set (TRL's configs set it: default True); 4.x knows only the old."""
    from transformers import TrainingArguments
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    out = {name: enabled}
    if kwargs is not None:
        out[f"{name}_kwargs"] = kwargs
    return out


def trl_args(cfg: TrainConfig, output_dir: str, use_cpu: bool):
    from trl import DPOConfig
    d = cfg.dpo
    types = [d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type)
    if "sigmoid" in types and d.label_smoothing > 0:  # TRL would train plain DPO without a word
        raise ConfigError(f"dpo.label_smoothing: TRL's sigmoid loss ignores it (conservative DPO is dpo_lab's "
                          f"only); use loss type robust or label_smoothing 0 with TRL (got {d.label_smoothing!r})")
    return DPOConfig(
        output_dir=output_dir, beta=d.beta, loss_type=types, loss_weights=d.loss_weights,
        label_smoothing=d.label_smoothing, f_divergence_type=d.f_divergence_type,
        f_alpha_divergence_coef=d.f_alpha_divergence_coef, ld_alpha=d.ld_alpha, discopop_tau=d.discopop_tau,
        precompute_ref_log_probs=d.precompute_ref,
        # Not mapped, ours only: data.packing (TRL 1.16's `padding_free` is switched off: it warns
        # and pads) and dpo.chunked_logps (TRL's twin, `use_liger_kernel`, needs liger-kernel). Both
        # give the plain path's numbers (tests/test_trainer_fast_paths.py), so TRL runs padded.
        learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        lr_scheduler_type=cfg.train.schedule, warmup_steps=cfg.train.warmup_ratio,
        max_steps=cfg.train.max_steps or -1, num_train_epochs=cfg.train.epochs,
        per_device_train_batch_size=cfg.train.micro_batch,
        gradient_accumulation_steps=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm,
        max_length=cfg.data.max_length, seed=cfg.train.seed, data_seed=cfg.train.seed,
        **checkpointing_args(cfg.model.gradient_checkpointing, {"use_reentrant": True}),
        bf16=(cfg.model.dtype == "bfloat16" and not use_cpu), fp16=False, use_cpu=use_cpu,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=False,
        dataloader_num_workers=0, remove_unused_columns=False)


def peft_config(cfg: TrainConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")


def build_trainer(cfg: TrainConfig, output_dir: str, rows=None, use_cpu: bool | None = None):
    """A ready DPOTrainer on cfg's data (or `rows`), PEFT LoRA on a 4-bit base."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_lab.dpo.trainer import load_data
    use_cpu = (not torch.cuda.is_available()) if use_cpu is None else use_cpu
    model, tok = load_policy(cfg)
    if rows is None:
        rows, _ = load_data(cfg, tok)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    torch.manual_seed(cfg.train.seed)  # LoRA A init, as in dpo_lab's trainer
    return DPOTrainer(model=model, args=trl_args(cfg, output_dir, use_cpu), train_dataset=data,
                      processing_class=tok, peft_config=peft_config(cfg))


def first_batch(trainer, n: int) -> dict:
    """TRL's loss and logged metrics on its collated first n rows (in dataset order)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    batch = trainer._prepare_inputs(batch)
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    out = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    out["loss"] = loss.item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", default=None)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.output_dir or cfg.output_dir + "_trl"
    trainer = build_trainer(cfg, out)
    trainer.train()
    trainer.save_model(out + "/adapter")  # PEFT format: adapter_config.json + safetensors
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
