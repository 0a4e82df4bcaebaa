"""The FSDP + QLoRA DPO trainer: 4-bit loading, sharding, logs, the saved adapter, bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn

from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA paper: ~4.127 bits per parameter


def test_nf4_double_quant_and_bf16_adapters_single_process():
    from dpo_lab.dpo.qlora import add_lora, decoder_layers, load_quantized, memory_report
    cfg = load_config(TINY)
    model, tok = load_quantized(cfg.model, cfg.quant)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.weight.quant_state.nested  # float storage
    rep = memory_report(model)
    assert rep["base_bits_per_param"] == pytest.approx(NF4_DQ_BITS, abs=0.005)
    x = torch.tensor([tok("12+30=")["input_ids"]])
    base_logits = model(input_ids=x).logits
    model = add_lora(model, cfg.lora, seed=0)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    assert len(decoder_layers(model)) == model.config.num_hidden_layers
    with model.disable_adapter():  # the reference policy is the base itself
        torch.testing.assert_close(model(input_ids=x).logits, base_logits)


def test_unwrappable_model_is_named():
    from dpo_lab.dpo.qlora import WrapError, decoder_layers
    with pytest.raises(WrapError, match="Sequential"):
        decoder_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_more_ranks_than_gpus_fails_before_launch():
    from dpo_lab.dpo.trainer import preflight
    if torch.cuda.device_count() >= 64:
        pytest.skip("a machine with 64 GPUs")
    with pytest.raises(ConfigError, match="needs 64 GPUs"):
        preflight(load_config(TINY), 64, backend="nccl")


def test_invalid_row_fails_before_launch(tmp_path):
    from dpo_lab.data import InvalidRowError
    from dpo_lab.dpo.trainer import preflight
    bad = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4"}]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidRowError, match="line 2"):
        preflight(load_config(TINY, [f"data.source={bad}"]), 1, backend="gloo")


def test_cli_rejects_unknown_key(capsys):
    from dpo_lab.dpo.trainer import cli_main
    assert cli_main(["--config", str(TINY), "train.learning_rate=1e-4"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_ranks_shard_train_log_and_save_a_peft_adapter(tmp_path):
    from dpo_lab.dpo.evaluate import load_with_adapter, preference_accuracy
    from dpo_lab.dpo.trainer import run
    from dpo_lab.task import TASK_DIR, read_jsonl
    cfg = load_config(TINY, ["train.max_steps=4", "train.micro_batch=8", "eval.max_rows=32",
                             "train.lr=3e-3", "checkpoint.resume=false", f"output_dir={tmp_path}"])
    res = run(cfg, nproc=2, timeout=600)
    # real sharding: each rank holds half of the 4-bit base and of the adapters
    for mem in res["rank_memory"]:
        assert mem["base_local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert mem["adapters_local_fraction"] == pytest.approx(0.5, abs=0.01)
    hist = res["history"]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference, bitwise
    assert res["eval_after"]["reward_margin"] > 0 and res["eval_after"]["pref_accuracy"] > 0.5
    logged = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 4
    for key in ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected"):
        assert key in logged[-1]
    # the adapter is PEFT-format and is exactly what was trained
    model, tok = load_with_adapter(cfg, res["adapter_dir"])
    rows = read_jsonl(TASK_DIR / "test.jsonl")[:32]
    ev = preference_accuracy(model, tok, rows, cfg.dpo.beta, cfg.data.max_length)
    assert ev["reward_margin"] == pytest.approx(res["eval_after"]["reward_margin"], rel=0.05, abs=1e-3)
    assert ev["reward_margin"] > 0
