"""TRL's DPOTrainer (PEFT + 4-bit, single CPU process) against dpo_lab's FSDP trainer."""
import math

import pytest
import torch

from dpo_lab.dpo.config import load_config
from dpo_lab.paths import CONFIG_DIR
from dpo_lab.task import TASK_DIR, read_jsonl

# One global batch of 16 pairs, no warm-up: both trainers see the same batch at every step.
OVERRIDES = ["train.max_steps=3", "train.warmup_ratio=0", "train.schedule=constant", "train.lr=2e-3",
             "data.max_rows=16", "train.micro_batch=16", "eval.max_rows=16", "checkpoint.resume=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dpo_lab.dpo.trl_recipe import build_trainer
    out = tmp_path_factory.mktemp("trl")
    cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", OVERRIDES + [f"output_dir={out / 'ours'}"])
    rows = read_jsonl(TASK_DIR / "train.jsonl")[:16]
    return cfg, rows, build_trainer(cfg, str(out / "trl"), rows=rows, use_cpu=True)


def test_recipe_avoids_the_known_traps(setup):
    cfg, _, trainer = setup
    model = trainer.model
    assert getattr(model, "is_loaded_in_4bit", False)
    assert trainer.ref_model is None  # reference = adapters disabled, not a 2nd copy
    assert list(model.peft_config) == ["default"]  # no accidental "ref" adapter
    w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert w.dtype == torch.bfloat16 and w.quant_state.nested  # float storage, double quant
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)


def test_first_batch_loss_equals_dpo_lab(setup):
    from dpo_lab.dpo.batching import collate, encode_rows
    from dpo_lab.dpo.loss import dpo_metrics
    from dpo_lab.dpo.qlora import add_lora, load_quantized
    from dpo_lab.dpo.trainer import dpo_step_terms
    from dpo_lab.dpo.trl_recipe import first_batch
    cfg, rows, trainer = setup
    theirs = first_batch(trainer, 8)
    model, tok = load_quantized(cfg.model, cfg.quant)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    # the collators agree token for token
    ours_batch = collate(encode_rows(tok, rows[:8]), tok.pad_token_id, cfg.data.max_length)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours_batch["loss_mask"].long(), trl_batch["completion_mask"].long())
    ours = dpo_metrics(*dpo_step_terms(model, ours_batch, cfg))
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    for key in ("logits/chosen", "logits/rejected"):  # TRL's definition, TRL's code
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    # step 1: policy == reference, every margin ties at 0 and TRL's strict `>` counts none right
    assert ours["rewards/accuracies"] == theirs["rewards/accuracies"] == 0.0
    assert ours["logps/chosen"] > ours["logps/rejected"] + 1  # a real batch, not a degenerate one


def test_logits_metrics_equal_trls_on_unequal_lengths(setup, tmp_path):
    """TRL's `logits/chosen` is a token-weighted mean over the batch's completion tokens; with
    completions of different lengths a per-sequence mean, a wrong shift or swapped halves differ."""
    cfg, rows, _ = setup
    ours, theirs, batch = _first_step_on_unequal_lengths(cfg, rows, tmp_path)
    assert len(set(batch["loss_mask"].sum(1).tolist())) > 2  # lengths really differ
    for key in ("logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.distributed
def test_loss_zoo_settings_reach_both_trainers(setup, tmp_path):
    """MPO (sigmoid + bco_pair + sft, weighted) with LD-DPO sums, on completions of unequal length:
    the SFT term must average plain token log-probs, the policy AND reference sums must both be
    LD-DPO's (else the step-1 margins would not be 0), and the weights must reach both trainers."""
    import dataclasses

    base, rows, _ = setup
    cfg = dataclasses.replace(base, dpo=dataclasses.replace(
        base.dpo, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.5))
    ours, theirs, _ = _first_step_on_unequal_lengths(cfg, rows, tmp_path)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    # step 1: sigmoid and bco_pair give ln 2 and 2 ln 2, the rest is the SFT term's NLL
    assert ours["loss"] - (0.8 + 0.2 * 2) * math.log(2) > 0.1


def test_training_losses_equal_dpo_lab_trainer(setup):
    """After real optimizer steps (not only the ln 2 of step 1) the logged losses still agree.
    Ours precomputes the reference log-probs, TRL computes them on the fly: same numbers."""
    from dataclasses import replace

    from dpo_lab.dpo.trainer import run
    cfg, _, trainer = setup
    trainer._metrics["train"].clear()  # else first_batch's metrics are averaged into step 1's log
    trainer.train()
    trl = [h for h in trainer.state.log_history if "loss" in h]
    ours = run(replace(cfg, dpo=replace(cfg.dpo, precompute_ref=True)), nproc=1, timeout=300)["history"]
    assert len(trl) == len(ours) == 3
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert trl[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    for a, b in zip(trl, ours):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
        for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
            assert b[key] == pytest.approx(a[key], abs=1e-3), key  # the trainer's own aggregation
    assert ours[0]["rewards/accuracies"] == trl[0]["rewards/accuracies"] == 0.0  # ties at step 1
    assert ours[1]["rewards/accuracies"] > 0  # after one update the adapters rank pairs
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.02


def test_accelerate_configs():
    import yaml
    fsdp = yaml.safe_load((CONFIG_DIR / "accelerate" / "fsdp_qlora.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ds = yaml.safe_load((CONFIG_DIR / "accelerate" / "deepspeed_zero3.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero_stage"] == 3
    for name in ("llama3_8b_2gpu.yaml", "llama3_8b_8gpu.yaml"):  # the GPU recipes keep storage = dtype
        cfg = load_config(CONFIG_DIR / "dpo" / name)
        assert cfg.quant.storage_dtype == cfg.model.dtype == "bfloat16"
        assert cfg.model.gradient_checkpointing


def _first_step_on_unequal_lengths(cfg, rows, tmp_path):
    """Six pairs whose completions differ in length; (our step-1 metrics, TRL's, our batch)."""
    from dpo_lab.dpo.batching import collate, encode_rows
    from dpo_lab.dpo.loss import dpo_metrics
    from dpo_lab.dpo.qlora import add_lora, load_quantized
    from dpo_lab.dpo.trainer import dpo_step_terms
    from dpo_lab.dpo.trl_recipe import build_trainer, first_batch
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"] + "0" * i, "rejected": r["rejected"][:1]}
            for i, r in enumerate(rows[:6])]
    theirs = first_batch(build_trainer(cfg, str(tmp_path), rows=rows, use_cpu=True), len(rows))
    model, tok = load_quantized(cfg.model, cfg.quant)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    batch = collate(encode_rows(tok, rows), tok.pad_token_id, cfg.data.max_length)
    return dpo_metrics(*dpo_step_terms(model, batch, cfg)), theirs, batch
