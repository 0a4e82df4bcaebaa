"""The reference log-probs cache: keyed by data row, fingerprinted, reused with zero reference
forwards, recomputed when an input changes or a file is corrupt, equal to the plain path at 1 and
2 ranks, and used by a resumed run."""
import dataclasses
import json
import math
import shutil

import pytest

from dpo_lab.dpo import ref_cache
from dpo_lab.dpo.config import load_config
from dpo_lab.paths import CONFIG_DIR

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def base():
    from transformers import AutoTokenizer

    from dpo_lab.dpo.qlora import resolve_model
    model_dir = resolve_model("tiny-sft")
    return load_config(TINY), model_dir, AutoTokenizer.from_pretrained(model_dir)


def _changed(what, base, tmp_path):
    """(cfg, model_dir, tok) with one fingerprint input changed."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    cfg, model_dir, tok = base
    if what == "weights":  # same files, one weight nudged: the adapter-free base differs
        model_dir = shutil.copytree(model_dir, tmp_path / "model")
        sd = load_file(str(model_dir / "model.safetensors"))
        name = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
        sd[name][0, 0] += 1e-3
        save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    elif what == "tokenizer":
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.add_tokens(["<extra>"])
    elif what == "max_length":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=cfg.data.max_length + 1))
    elif what == "dtype":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    elif what == "quant":  # a 4-bit base's reference differs from a full-precision one
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, load_in_4bit=False))
    elif what == "ld_alpha":
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, ld_alpha=0.5))
    elif what == "logps_path":  # full logits instead of the chunked head
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, chunked_logps=False))
    elif what == "packing":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))
    return cfg, model_dir, tok


@pytest.mark.parametrize("what", ["weights", "tokenizer", "max_length", "dtype", "quant", "ld_alpha", "logps_path", "packing"])
def test_each_fingerprint_input_changes_the_cache_dir(what, base, tmp_path):
    key = b"k" * 16
    same = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*base))
    same.save({key: (-1.0, -2.0)})
    again = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*base))
    assert again.dir == same.dir and again.load() == ({key: (-1.0, -2.0)}, [])  # unchanged: a hit
    other = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*_changed(what, base, tmp_path)))
    assert other.dir != same.dir and other.load() == ({}, [])  # changed: a miss, so recomputed


def test_a_row_is_keyed_by_its_token_ids(base):
    from dpo_lab.dpo.batching import encode_pair
    _, _, tok = base
    row = {"prompt": "12+30=", "chosen": "42", "rejected": "41"}
    key = ref_cache.row_key(encode_pair(tok, row))
    assert key == ref_cache.row_key(encode_pair(tok, dict(row)))
    for field, text in [("prompt", "12+31="), ("chosen", "43"), ("rejected", "40")]:
        assert ref_cache.row_key(encode_pair(tok, {**row, field: text})) != key, field


def test_corrupt_part_and_manifest_are_named_and_dropped(base, tmp_path):
    cache = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*base))
    part = cache.save({bytes([i]) * 16: (-float(i), -2.0 * i) for i in range(8)})
    assert len(cache.load()[0]) == 8
    part.write_bytes(part.read_bytes()[:-5])  # a torn write
    table, problems = cache.load()
    assert table == {} and len(problems) == 1 and str(part) in problems[0] and "recomputed" in problems[0]
    cache.manifest.write_text('{"parts": [')  # half a manifest
    table, problems = cache.load()
    assert table == {} and str(cache.manifest) in problems[0]
    cache.save({b"k" * 16: (-1.0, -2.0)})  # a fresh part makes it whole again
    assert cache.load() == ({b"k" * 16: (-1.0, -2.0)}, [])


def _cfg(tmp_path, name, *extra):
    return load_config(TINY, ["train.max_steps=3", "train.micro_batch=8", "eval.max_rows=16",
                              "checkpoint.resume=false", f"output_dir={tmp_path / name}",
                              "dpo.ref_cache=true", f"dpo.ref_cache_dir={tmp_path / 'cache'}", *extra])


def _diff(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in KEYS)


@pytest.mark.distributed
def test_one_rank_cache_is_reused_across_beta_and_equals_the_plain_path(tmp_path):
    from dpo_lab.dpo.trainer import run
    first = run(_cfg(tmp_path, "a", "dpo.beta=0.2"), nproc=1, timeout=600)
    assert first["rank_reference_forwards"] == [3]  # 3 steps x 1 micro-batch, before step 1
    assert first["ref_cache"]["computed"] == 24 and first["ref_precompute_seconds"] > 0
    sweep = run(_cfg(tmp_path, "b", "dpo.beta=0.4"), nproc=1, timeout=600)
    assert sweep["rank_reference_forwards"] == [0] and sweep["ref_cache"]["reused"] == 24
    plain = run(_cfg(tmp_path, "c", "dpo.beta=0.4", "dpo.ref_cache=false"), nproc=1, timeout=600)
    assert plain["rank_reference_forwards"] == [3] and plain["ref_cache"] is None  # one per micro-batch
    assert _diff(sweep["history"], plain["history"]) <= 1e-6
    assert plain["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert plain["history"][-1]["rewards/margins"] != 0  # it trained, so the rewards are compared
    # a torn cache file: named, recomputed, same history
    part = next((tmp_path / "cache" / "ref_logps").glob("*/part-*.safetensors"))
    part.write_bytes(part.read_bytes()[:100])
    again = run(_cfg(tmp_path, "d", "dpo.beta=0.4"), nproc=1, timeout=600)
    assert again["rank_reference_forwards"] == [3]
    assert any(str(part) in p for p in again["ref_cache"]["problems"])
    assert _diff(again["history"], plain["history"]) <= 1e-6
    assert json.loads((tmp_path / "d" / "result.json").read_text())["ref_cache"]["computed"] == 24


@pytest.mark.distributed
def test_two_ranks_decide_together_equal_the_plain_path_and_resume_from_the_cache(tmp_path):
    """A 1-rank run caches the rows of step 1's first half; at 2 ranks that is rank 0's micro-batch
    of step 1 and not rank 1's, so only a collective decision keeps the FSDP forwards in step."""
    from dpo_lab.dpo.trainer import run
    run(_cfg(tmp_path, "one", "train.max_steps=1"), nproc=1, timeout=600)
    extra = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=0")
    cached = run(_cfg(tmp_path, "two", *extra), nproc=2, timeout=600, restart_step=2,
                 restart_dir=tmp_path / "restart")
    assert cached["ref_cache"]["reused"] == 8 and cached["ref_cache"]["computed"] == 56
    assert cached["rank_reference_forwards"] == [4, 4]  # every micro-batch held a missing row somewhere
    restart = cached["restart"]
    assert restart["start_step"] == 2 and restart["rank_reference_forwards"] == [0, 0]
    assert _diff(restart["history"], cached["history"]) <= 1e-6
    plain = run(_cfg(tmp_path, "plain", *extra, "dpo.ref_cache=false"), nproc=2, timeout=600)
    assert plain["rank_reference_forwards"] == [4, 4]
    assert _diff(cached["history"], plain["history"]) <= 1e-6
