"""The trainer's fast paths, on by default (chunked log-probs: dpo_lab.dpo.logprobs; padding-free
batches: dpo_lab.dpo.packing), against its plain path: padded rows, full fp32 logits and
`loss.sequence_logps` / `ld.ld_weights`, which share no code with them. Whole runs are compared
step by step (loss, rewards/*, logps/*, logits/*, the real-token count) at 1 and 2 ranks."""
import json

import pytest
import torch

from dpo_lab.dpo.batching import collate, encode_pair
from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR
from dpo_lab.task import TASK_DIR, read_jsonl

PLAIN = ["dpo.chunked_logps=false", "data.packing=false"]
# a chunk of 7 tokens and rows of 40: several chunks with a remainder, several packed rows
CHUNKED_PACKED = ["dpo.logps_chunk_size=7", "data.max_tokens_per_row=40"]
COMBOS = {"plain/padded": PLAIN, "plain/packed": ["dpo.chunked_logps=false", "data.max_tokens_per_row=40"],
          "chunked/padded": ["dpo.logps_chunk_size=7", "data.packing=false"], "chunked/packed": CHUNKED_PACKED}
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm")
LD_SFT = ["dpo.loss_type=['sigmoid', 'sft']", "dpo.ld_alpha=0.5"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Training rows whose completions differ in length (the shipped ones are mostly 2 digits each
    side): LD-DPO's α then matters, padded rows really pad, packed rows pack sequences unevenly."""
    rows = read_jsonl(TASK_DIR / "train.jsonl")[:16]
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"] + "0" * (i % 4),
             "rejected": r["rejected"][:1] if i % 2 else r["rejected"]} for i, r in enumerate(rows)]
    path = tmp_path_factory.mktemp("data") / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data_file, out, overrides, ranks=1):
    batches = ["train.micro_batch=4", f"train.grad_accum={2 // ranks}"]  # one global batch of 8 pairs
    return load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [
        "train.max_steps=2", "train.warmup_ratio=0", "train.schedule=constant", "train.lr=2e-3",
        f"data.source={data_file}", "data.split=train", "data.eval_split=train", "eval.max_rows=4",
        "checkpoint.resume=false", "checkpoint.every=0", f"output_dir={out}", *batches, *overrides])


def _runs(cfg_dicts):
    """Rank function: train_rank for each config in turn (one launch, not one per run); rank 0's
    histories, with the held-out evaluation after training as a last record."""
    from dpo_lab.dpo.trainer import train_rank
    return [[*r["history"], r["eval_after"]] if "history" in r else None
            for r in (train_rank(c) for c in cfg_dicts)]


def _launch(cfgs, ranks):
    from dpo_lab.parallel import launch
    return launch(_runs, ranks, args=([c.to_dict() for c in cfgs],), timeout=1200)[0]


def _assert_same_history(got, want, what):
    assert len(got) == len(want) == 3, what
    (got, g_eval), (want, w_eval) = (got[:2], got[2]), (want[:2], want[2])
    # held-out evaluation (evaluate_preferences scores in the configured layout and head path too)
    assert g_eval["rows"] == w_eval["rows"] == 4, what
    for key in ("pref_accuracy", "likelihood_accuracy", "ref_likelihood_accuracy", "reward_margin"):
        assert g_eval[key] == pytest.approx(w_eval[key], abs=2e-5), f"{what}, eval: {key}"
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g["tokens"] == w["tokens"], f"{what}, step {step}: tokens"
        for key in KEYS:
            rel = 1e-3 if key == "grad_norm" else 1e-5  # the norm of bf16 LoRA gradients
            assert g[key] == pytest.approx(w[key], abs=2e-5, rel=rel), f"{what}, step {step}: {key}"


@pytest.fixture(scope="module")
def one_rank(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs1")
    runs = {name: _cfg(data_file, out / name.replace("/", "_"), o) for name, o in COMBOS.items()}
    runs["defaults+precompute_ref"] = _cfg(data_file, out / "pre", ["dpo.precompute_ref=true"])
    runs["ld_sft plain/padded"] = _cfg(data_file, out / "ld_plain", PLAIN + LD_SFT)
    runs["ld_sft chunked/packed"] = _cfg(data_file, out / "ld_fast", CHUNKED_PACKED + LD_SFT)
    runs["sft plain/padded"] = _cfg(data_file, out / "sft_plain", PLAIN + ["dpo.loss_type=['sigmoid', 'sft']"])
    runs["sft chunked/packed"] = _cfg(data_file, out / "sft_fast", CHUNKED_PACKED + ["dpo.loss_type=['sigmoid', 'sft']"])
    full = ["quant.load_in_4bit=false"]  # LoRA on a plain fp32 base: no bitsandbytes kernels
    runs["lora plain/padded"] = _cfg(data_file, out / "lora_plain", PLAIN + full)
    runs["lora chunked/packed"] = _cfg(data_file, out / "lora_fast", CHUNKED_PACKED + full)
    return dict(zip(runs, _launch(list(runs.values()), 1)))


def test_defaults_are_the_fast_paths():
    cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml")
    assert cfg.dpo.chunked_logps and cfg.data.packing and cfg.dpo.logps_chunk_size == 256
    assert cfg.data.max_tokens_per_row is None


@pytest.mark.distributed
def test_four_paths_give_one_history_at_one_rank(one_rank):
    want = one_rank["plain/padded"]
    for name in ("plain/packed", "chunked/padded", "chunked/packed", "defaults+precompute_ref"):
        _assert_same_history(one_rank[name], want, name)
    assert want[1]["rewards/accuracies"] > 0  # step 2 has learned something: not a trivial history
    # real tokens only: the 16 pairs' prompt + completion tokens, not padding or row filler
    assert want[0]["tokens"] + want[1]["tokens"] < 2 * 8 * 2 * 32


@pytest.mark.distributed
def test_non_quantised_base_fast_equals_plain(one_rank):
    _assert_same_history(one_rank["lora chunked/packed"], one_rank["lora plain/padded"], "non-quantised")
    assert one_rank["lora plain/padded"][1]["loss"] != one_rank["plain/padded"][1]["loss"]  # another base


@pytest.mark.distributed
def test_ld_dpo_and_sft_in_a_loss_list_fast_equals_plain(one_rank):
    _assert_same_history(one_rank["ld_sft chunked/packed"], one_rank["ld_sft plain/padded"], "ld_alpha + sft")
    _assert_same_history(one_rank["sft chunked/packed"], one_rank["sft plain/padded"], "sft")
    # the LD weights change something here (completion lengths differ within pairs)
    assert one_rank["ld_sft plain/padded"][0]["logps/chosen"] != pytest.approx(
        one_rank["sft plain/padded"][0]["logps/chosen"], abs=1e-3)


@pytest.mark.distributed
def test_four_paths_give_one_history_at_two_ranks(data_file, tmp_path, one_rank):
    """FSDP2 over 2 gloo ranks (each its half of the global batch); also equal to the 1-rank run."""
    names = list(COMBOS)
    overrides = [COMBOS[n] if n != "chunked/packed" else [] for n in names]  # defaults: one packed row
    cfgs = [_cfg(data_file, tmp_path / str(i), o, ranks=2) for i, o in enumerate(overrides)]
    got = dict(zip(names, _launch(cfgs, 2)))
    for name in names:
        _assert_same_history(got[name], one_rank["plain/padded"], f"2 ranks, {name}")


def test_policy_forward_fast_paths_equal_plain_values_and_gradients():
    """One micro-batch through the trainer's `policy_forward` on a tiny untied model (no FSDP, no
    LoRA): completions of uneven lengths, an empty prompt (its first token must not be
    "predicted" across a packed seam), LD-DPO sums, every output and the gradients."""
    from dpo_lab.dpo.packing import pack
    from dpo_lab.dpo.trainer import policy_forward
    from dpo_lab.models import build_tiny_model, build_tokenizer
    tok = build_tokenizer()
    rows = [{"prompt": "37+5=", "chosen": "42", "rejected": "32 or so"},
            {"prompt": "Hi", "chosen": "Hello there, how can I help?", "rejected": "!"}]
    exs = [encode_pair(tok, r) for r in rows]
    exs.append({"prompt_ids": [], "chosen_ids": tok("abc<eos>")["input_ids"],
                "rejected_ids": tok("zz top<eos>")["input_ids"]})
    model = build_tiny_model("qwen2", seed=0, num_hidden_layers=2, tie_word_embeddings=False)

    def run(batch, ld_alpha):
        model.zero_grad()
        pc, pr, (logit_sums, lengths), plain = policy_forward(model, batch, ld_alpha)
        (pc.sum() - 2 * pr.sum() + 0.5 * plain.sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return [t.detach() for t in (pc, pr, logit_sums, lengths.float(), plain)], grads

    padded = collate(exs, tok.pad_token_id)
    for ld_alpha in (None, 0.3):
        want, want_grads = run(padded, ld_alpha)
        for name, batch in (("chunked/padded", {**padded, "logps_chunk_size": 3}),
                            ("plain/packed", pack(exs, max_tokens=40, pad_id=tok.pad_token_id)),
                            ("chunked/packed", {**pack(exs, max_tokens=40, pad_id=tok.pad_token_id),
                                                "logps_chunk_size": 3})):
            assert "seq_id" not in batch or batch["input_ids"].shape[0] >= 2  # seams inside and across rows
            got, grads = run(batch, ld_alpha)
            for g, w, what in zip(got, want, ("chosen", "rejected", "logit sums", "lengths", "plain chosen")):
                torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name} {ld_alpha} {what}: {m}")
            for k, g in grads.items():
                torch.testing.assert_close(g, want_grads[k], atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} {ld_alpha} grad {k}: {m}")


def test_bad_fast_path_settings_are_named():
    path = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match=r"data.max_tokens_per_row: must be >= data.max_length=32"):
        load_config(path, ["data.max_tokens_per_row=31"])
    load_config(path, ["data.max_tokens_per_row=31", "data.packing=false"])  # unused then
    with pytest.raises(ConfigError, match=r"dpo.logps_chunk_size: .*got 0"):
        load_config(path, ["dpo.logps_chunk_size=0"])
    with pytest.raises(ConfigError, match=r"dpo.chunked_logps: must be true or false"):
        load_config(path, ["dpo.chunked_logps=1"])
