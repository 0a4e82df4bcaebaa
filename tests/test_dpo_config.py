"""The DPO run's config, data plan and batches: fast checks, no model."""
from pathlib import Path

import pytest

from dpo_lab.dpo.batching import BatchPlan, collate, encode_pair
from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR

SHIPPED = sorted((CONFIG_DIR / "dpo").glob("*.yaml"))


def test_shipped_configs_load():
    assert {p.name for p in SHIPPED} >= {"tiny_cpu.yaml", "llama3_8b_2gpu.yaml", "llama3_8b_8gpu.yaml"}
    for path in SHIPPED:
        cfg = load_config(path)
        # the storage dtype FSDP shards is never cast by a mixed-precision policy
        assert cfg.fsdp.param_dtype in (None, cfg.quant.storage_dtype), path


def test_overrides_are_typed():
    cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml",
                      ["train.lr=1e-4", "dpo.beta=0.3", "lora.target_modules=['q_proj']",
                       "train.max_steps=null", "model.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-4 and cfg.dpo.beta == 0.3
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.max_steps is None and cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize("override, words", [
    ("train.learning_rate=1e-4", ["learning_rate", "did you mean", "lr"]),
    ("lora.rank=8", ["rank"]),
    ("optimizer.lr=1", ["optimizer"]),
])
def test_unknown_key_is_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("fsdp.param_dtype=float32", ["fsdp.param_dtype", "storage_dtype"]),
    ("dpo.loss_type=kto", ["loss_type"]),
    ("dpo.beta=0", ["beta"]),
    ("quant.storage_dtype=uint8", ["floating"]),
    ("quant.compute_dtype=bfloat16", ["model.dtype"]),
])
def test_impossible_values_fail_early(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [override])
    for w in words:
        assert w in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path("configs/dpo/nope.yaml"))


def test_plan_same_global_batch_on_1_and_2_ranks():
    one = BatchPlan(100, micro_batch=4, grad_accum=2, world_size=1, seed=3)
    two = BatchPlan(100, micro_batch=4, grad_accum=1, world_size=2, seed=3)
    for step in range(30):  # crosses epochs (12 steps each)
        ws1 = [i for mb in one.micro_indices(step, 0) for i in mb]
        ws2 = [i for r in range(2) for mb in two.micro_indices(step, r) for i in mb]
        assert ws1 == ws2 and len(set(ws1)) == 8
    epoch = [i for s in range(12) for i in one.global_indices(s)]
    assert len(set(epoch)) == 96  # no row twice within an epoch
    assert one.global_indices(12) != one.global_indices(0)  # a new permutation per epoch


def test_plan_too_few_rows():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchPlan(5, micro_batch=4, grad_accum=1, world_size=2)


def test_batch_masks_completion_and_eos():
    from dpo_lab.models import build_tokenizer
    tok = build_tokenizer()
    rows = [{"prompt": "12+30=", "chosen": "42", "rejected": "32"},
            {"prompt": "5+5=", "chosen": "10", "rejected": "0"}]
    enc = [encode_pair(tok, r) for r in rows]
    assert enc[0]["chosen_ids"][-1] == tok.eos_token_id and len(enc[0]["chosen_ids"]) == 3
    b = collate(enc, tok.pad_token_id)
    assert b["input_ids"].shape == (4, 9)  # [chosen0, chosen1, rejected0, rejected1], right-padded
    assert tok.decode(b["input_ids"][0][b["loss_mask"][0]]) == "42<eos>"
    assert tok.decode(b["input_ids"][3][b["loss_mask"][3]]) == "0<eos>"
    assert b["attention_mask"][3].tolist() == [1] * 6 + [0] * 3
    assert not b["loss_mask"][:, :4].any()  # prompts never count
    cut = collate(enc, tok.pad_token_id, max_length=7)
    assert cut["input_ids"].shape[1] == 7 and tok.decode(cut["input_ids"][0][cut["loss_mask"][0]]) == "4"
