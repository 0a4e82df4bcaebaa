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


# --- every value is type- and range-checked before any rank starts ---------------------------------

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"


@pytest.fixture
def no_ranks(monkeypatch):
    """Any attempt to start training fails the test: a bad config must stop before it."""
    from dpo_lab.dpo import trainer

    def started(*a, **k):
        raise AssertionError("a run was started with a bad config")
    monkeypatch.setattr(trainer, "run", started)
    monkeypatch.setattr(trainer, "preflight", started)


@pytest.mark.parametrize("override, message", [
    ("dpo.beta=abc", "dpo.beta: must be a number (got 'abc')"),
    ("dpo.beta=true", "dpo.beta: must be a number, not a boolean (got True)"),
    ("train.lr=-1", "train.lr: must be greater than 0 (got -1)"),
    ("train.max_steps=2.5", "train.max_steps: must be an integer (got 2.5)"),
    ("train.max_steps=true", "train.max_steps: must be an integer (got True)"),
    ("eval.batch=0", "eval.batch: must be greater than or equal to 1 (got 0)"),
    ("train.seed=1.5", "train.seed: must be an integer (got 1.5)"),
    ("train.seed=abc", "train.seed: must be an integer (got 'abc')"),
    ("train.warmup_ratio=1", "train.warmup_ratio: must be less than 1 (got 1)"),
    ("model.gradient_checkpointing=1", "model.gradient_checkpointing: must be true or false (got 1)"),
    ("lora.target_modules=q_proj", "lora.target_modules: must be a list (got 'q_proj')"),
    ("dpo.loss_type=nope", "dpo.loss_type: unknown loss type 'nope'; valid: sigmoid, hinge, ipo, exo_pair, "
                           "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
                           "discopop, sft, sigmoid_norm (got 'nope')"),
    ("train.learning_rate=1e-4", "train.learning_rate: unknown config key; did you mean train.lr? (got 0.0001)"),
    ("data.source=./no/such/prefs.jsonl", "data.source: no such file: "),
])
def test_cli_names_the_bad_key_and_value_and_exits_2_before_any_rank(no_ranks, capsys, override, message):
    from dpo_lab.cli import main
    assert main(["train", "dpo", "--config", str(TINY), override]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and out == ""


def test_loss_zoo_settings_load_and_reach_trl():
    from dpo_lab.dpo.trl_recipe import trl_args
    cfg = load_config(TINY, ["dpo.loss_type=['sigmoid','bco_pair','sft']", "dpo.loss_weights=[0.8,0.2,1.0]",
                             "dpo.ld_alpha=0.5", "dpo.discopop_tau=0.1"])
    assert cfg.dpo.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.dpo.loss_weights == [0.8, 0.2, 1.0]
    args = trl_args(cfg, "/tmp/unused", use_cpu=True)
    assert (args.loss_type, args.loss_weights, args.ld_alpha, args.discopop_tau) == (
        ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.5, 0.1)
    fdiv = load_config(TINY, ["dpo.loss_type=ipo", "dpo.f_divergence_type=alpha_divergence",
                              "dpo.f_alpha_divergence_coef=0.3"])
    args = trl_args(fdiv, "/tmp/unused", use_cpu=True)
    assert (args.loss_type, args.f_divergence_type, args.f_alpha_divergence_coef) == (["ipo"], "alpha_divergence", 0.3)


@pytest.mark.parametrize("overrides, message", [
    (["dpo.loss_type=['sigmoid','kto']"], "dpo.loss_type: unknown loss type 'kto'; valid: sigmoid, hinge"),
    (["dpo.loss_type=[]"], "dpo.loss_type: must be a loss type or a non-empty list of loss types"),
    (["dpo.loss_type=['sigmoid','sft']", "dpo.loss_weights=[1.0]"],
     "dpo.loss_weights: 1 weights for 2 loss types ['sigmoid', 'sft'] (got [1.0])"),
    (["dpo.f_alpha_divergence_coef=1.5"], "dpo.f_alpha_divergence_coef: must be less than or equal to 1 (got 1.5)"),
    (["dpo.ld_alpha=-0.1"], "dpo.ld_alpha: must be greater than or equal to 0 (got -0.1)"),
    (["dpo.f_divergence_type=kl"], "dpo.f_divergence_type: must be 'reverse_kl', 'forward_kl', "),
    (["dpo.loss_type=nca_pair", "dpo.f_divergence_type=forward_kl"],
     "dpo.f_divergence_type: f_divergence_type='forward_kl' does not apply to loss type(s) ['nca_pair']"),
    (["dpo.loss_type=exo_pair"], "dpo.label_smoothing: must be > 0 with loss type exo_pair"),
    (["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: none of the loss types ['hinge']"),
])
def test_loss_settings_are_checked_together(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_trl_recipe_refuses_what_trl_would_ignore():
    from dpo_lab.dpo.trl_recipe import trl_args
    cfg = load_config(TINY, ["dpo.label_smoothing=0.1"])  # conservative DPO: TRL's sigmoid drops ε
    with pytest.raises(ConfigError, match="dpo.label_smoothing: TRL's sigmoid loss ignores it"):
        trl_args(cfg, "/tmp/unused", use_cpu=True)


def test_cli_bad_value_in_a_subprocess_is_one_line_and_no_traceback():
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(CONFIG_DIR.parent)}
    out = subprocess.run([sys.executable, "-m", "dpo_lab.cli", "train", "dpo", "--config", str(TINY),
                          "train.lr=-1"], capture_output=True, text=True, env=env, timeout=300)
    assert (out.returncode, out.stderr) == (2, "error: train.lr: must be greater than 0 (got -1)\n")


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("key", list(_leaf_keys(load_config(TINY).to_dict())))
def test_every_key_is_type_checked(key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, updates={key: {"not": "a value"}})
    assert str(e.value).startswith(f"{key}: ") and "(got {'not': 'a value'})" in str(e.value)


def test_yaml_1e_minus_3_is_a_float_and_the_dict_round_trip_is_exact(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n", encoding="utf-8")  # YAML 1.1 reads this as the string '1e-3'
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    from dpo_lab.dpo.config import from_dict
    assert from_dict(cfg.to_dict()) == cfg  # what each rank rebuilds from


def test_assignment_is_checked_too():
    cfg = load_config(TINY)
    with pytest.raises(ValueError, match="greater than 0"):
        cfg.train.lr = -1.0


def test_cli_unreadable_data_file_is_one_error_line(monkeypatch, capsys, tmp_path):
    from dpo_lab.cli import main
    from dpo_lab.data import load_preferences
    from dpo_lab.dpo import trainer
    # preflight without the model: only its data read (building the tiny model is slow here)
    monkeypatch.setattr(trainer, "preflight", lambda cfg, nproc, backend=None: load_preferences(cfg.data.source))
    path = tmp_path / "prefs.json"
    path.write_text('{"prompt": "1+2=", "chosen": "3", "rejected": "4"}\n' * 2, encoding="utf-8")
    assert main(["train", "dpo", "--config", str(TINY), f"data.source={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}, line 2: ") and "JSON Lines" in err and err.count("\n") == 1
