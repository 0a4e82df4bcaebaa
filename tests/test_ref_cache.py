"""The reference log-probs cache, on by default: keyed by the exact micro-batch a value was computed
in, fingerprinted, reused with zero reference forwards, recomputed when an input or the layout
changes or a file is corrupt; histories and adapters BITWISE equal to the plain path at 1 and 2
ranks, cold and warm, and after a resume."""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

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
    key, value = b"k" * 16, (b"r" * 16, -1.0, -2.0)
    same = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*base))
    same.save({key: value})
    again = ref_cache.RefCache(tmp_path, ref_cache.fingerprint_inputs(*base))
    assert again.dir == same.dir and again.load() == ({key: value}, [])  # unchanged: a hit
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
    part = cache.save({bytes([i]) * 16: (bytes([i]) * 16, -float(i), -2.0 * i) for i in range(8)})
    assert len(cache.load()[0]) == 8
    part.write_bytes(part.read_bytes()[:-5])  # a torn write
    table, problems = cache.load()
    assert table == {} and len(problems) == 1 and str(part) in problems[0] and "recomputed" in problems[0]
    cache.manifest.write_text('{"parts": [')  # half a manifest
    table, problems = cache.load()
    assert table == {} and str(cache.manifest) in problems[0]
    cache.save({b"k" * 16: (b"r" * 16, -1.0, -2.0)})  # a fresh part makes it whole again
    assert cache.load() == ({b"k" * 16: (b"r" * 16, -1.0, -2.0)}, [])


def test_prune_deletes_the_least_recently_used_until_the_cache_fits(base, tmp_path, capsys):
    import os
    from dpo_lab.cli import main
    caches = [ref_cache.RefCache(tmp_path, {**ref_cache.fingerprint_inputs(*base), "max_length": n}) for n in (1, 2, 3)]
    for i, c in enumerate(caches):
        c.save({bytes([k]) * 16: (bytes([k]) * 16, -1.0, -2.0) for k in range(4 * (i + 1))})
        os.utime(c.manifest, (1000.0 * (i + 1), 1000.0 * (i + 1)))  # used long ago, oldest first
    caches[0].load()  # a load is a use: the oldest becomes the newest
    sizes = {e["dir"]: e["bytes"] for e in ref_cache.usage(tmp_path)}
    assert [e["dir"] for e in ref_cache.usage(tmp_path)] == [caches[0].dir, caches[2].dir, caches[1].dir]
    assert [e["rows"] for e in ref_cache.usage(tmp_path)] == [4, 12, 8]
    # room for the two most recent: only the least recently used goes (caches[0] is fresh: kept anyway)
    gone = ref_cache.prune(tmp_path, sizes[caches[0].dir] + sizes[caches[2].dir])
    assert [e["dir"] for e in gone] == [caches[1].dir] and not caches[1].dir.exists()
    assert caches[2].load()[0] and caches[0].load()[0]
    os.utime(caches[2].manifest, (3000.0, 3000.0))
    assert main(["cache", "--dir", str(tmp_path), "--max-gib", "0"]) == 0
    out = capsys.readouterr().out
    assert f"deleted {caches[2].dir}" in out  # idle: deleted; caches[0] was just used: kept
    assert caches[0].dir.exists() and not caches[2].dir.exists() and "1 reference cache(s)" in out
    assert main(["cache", "--dir", str(tmp_path), "--max-gib", "-1"]) == 2


def _pairs(tok, n=3):
    from dpo_lab.dpo.batching import encode_pair
    return [encode_pair(tok, {"prompt": f"{i}+{2 * i}=", "chosen": str(3 * i), "rejected": str(3 * i + 1)})
            for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_the_micro_batch_key_holds_its_whole_make_up(packing, base):
    """Every difference that moves a forward's rounding gives another key: the rows, their order,
    the padded length, the thread count, the world size; the same make-up gives the same key."""
    from dpo_lab.dpo.trainer import micro_batch
    cfg, _, tok = base
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing))
    rows, env = _pairs(tok), {"threads": 2, "world_size": 1}

    def key(rs, e=env):
        return ref_cache.batch_key(micro_batch(rs, cfg, tok.pad_token_id), e)
    k = key(rows)
    assert key([dict(r) for r in rows]) == k  # rebuilt: the same
    padded = micro_batch(rows, cfg, tok.pad_token_id)  # the same rows, one more padding column
    wide = {n: torch.cat([v, torch.full_like(v[:, :1], tok.pad_token_id if n == "input_ids" else 0)], 1)
            if torch.is_tensor(v) and v.dim() == 2 else v for n, v in padded.items()}
    others = {"rows": key(rows[:2]), "order": key(rows[::-1]), "padded length": ref_cache.batch_key(wide, env),
              "threads": key(rows, {**env, "threads": 1}), "world size": key(rows, {**env, "world_size": 2})}
    for what, other in others.items():
        assert other != k, what
    assert len({ref_cache.entry_key(k, p) for p in range(3)}) == 3  # one entry per position


def _save_parts(args):
    root, inputs, worker = args
    cache = ref_cache.RefCache(root, inputs)
    for j in range(12):
        cache.save({bytes([worker, j]) * 8: (b"r" * 16, -float(j), -1.0)})
        table, problems = cache.load()  # a reader while others write: never a torn part
        assert problems == [], problems


def test_concurrent_writers_keep_every_part(base, tmp_path):
    """pytest-xdist workers can run trainers with one fingerprint at once: every part ends listed."""
    import multiprocessing as mp
    inputs = ref_cache.fingerprint_inputs(*base)
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_save_parts, [(tmp_path, inputs, w) for w in range(4)])
    table, problems = ref_cache.RefCache(tmp_path, inputs).load()
    assert problems == [] and set(table) == {bytes([w, j]) * 8 for w in range(4) for j in range(12)}


def _cfg(tmp_path, name, *extra, cache="cache"):
    return load_config(TINY, ["train.max_steps=3", "train.micro_batch=8", "eval.max_rows=16",
                              "checkpoint.resume=false", f"output_dir={tmp_path / name}",
                              f"dpo.ref_cache_dir={tmp_path / cache}", *extra])  # a cold cache of its own


def _same(a, b):
    """Histories equal BITWISE in every logged metric at every step (wall-clock time aside), and
    the final adapters too: the cache is exact by construction, so no tolerance."""
    from safetensors.torch import load_file
    assert [r["step"] for r in a["history"]] == [r["step"] for r in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert x.keys() == y.keys()
        diff = {k: (x[k], y[k]) for k in x if k != "seconds" and x[k] != y[k]}
        assert not diff, f"step {x['step']}: {diff}"
    wa, wb = (load_file(str(Path(r["adapter_dir"]) / "adapter_model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.distributed
def test_one_rank_plain_cold_warm_sweep_and_layout(tmp_path):
    from dpo_lab.dpo.trainer import run
    assert load_config(TINY).dpo.ref_cache is True  # on by default
    plain = run(_cfg(tmp_path, "plain", "dpo.ref_cache=false"), nproc=1, timeout=600)
    assert plain["rank_reference_forwards"] == [3] and plain["ref_cache"] is None  # one per micro-batch
    assert plain["history"][-1]["rewards/margins"] != 0  # it trained, so the rewards are compared
    cold = run(_cfg(tmp_path, "cold"), nproc=1, timeout=600)
    assert cold["rank_reference_forwards"] == [3]  # 3 steps x 1 micro-batch, before step 1
    assert cold["ref_cache"]["computed"] == 24 and cold["ref_precompute_seconds"] > 0
    warm = run(_cfg(tmp_path, "warm"), nproc=1, timeout=600)
    assert warm["rank_reference_forwards"] == [0] and warm["ref_cache"]["reused"] == 24
    _same(cold, plain)
    _same(warm, plain)
    sweep = run(_cfg(tmp_path, "sweep", "dpo.beta=0.4"), nproc=1, timeout=600)
    assert sweep["rank_reference_forwards"] == [0] and sweep["ref_cache"]["forwards"] == 0
    assert sweep["ref_cache"]["reused"] == 24 and sweep["ref_cache"]["computed"] == 0
    # another per-device batch (same global batch): other micro-batches, so recomputed, and said so
    layout = ("train.micro_batch=4", "train.grad_accum=2")
    relaid = run(_cfg(tmp_path, "relaid", *layout), nproc=1, timeout=600)
    # On this CPU the tiny model's floats happen not to move with this layout, so the stats are
    # what shows that it was recomputed rather than reused (a key by row alone reuses all 24).
    assert relaid["rank_reference_forwards"] == [6]
    assert relaid["ref_cache"]["computed"] == 24 and relaid["ref_cache"]["other_layout"] == 24
    _same(relaid, run(_cfg(tmp_path, "relaid_plain", *layout, "dpo.ref_cache=false"), nproc=1, timeout=600))
    # torn cache files: named, recomputed, same history
    parts = sorted((tmp_path / "cache" / "ref_logps").glob("*/part-*.safetensors"))
    assert len(parts) == 2  # cold's and relaid's: warm and sweep added nothing
    for part in parts:
        part.write_bytes(part.read_bytes()[:100])
    again = run(_cfg(tmp_path, "again"), nproc=1, timeout=600)
    assert all(any(str(part) in p for p in again["ref_cache"]["problems"]) for part in parts)
    assert again["rank_reference_forwards"] == [3] and again["ref_cache"]["computed"] == 24
    _same(again, plain)


@pytest.mark.distributed
def test_two_ranks_plain_cold_warm_and_resume(tmp_path):
    """At 2 ranks each micro-batch is keyed on the rank that scores it; a 1-rank cache of the same
    rows is another make-up (world size, threads), so it is not reused."""
    from dpo_lab.dpo.trainer import run
    run(_cfg(tmp_path, "one", "train.max_steps=1"), nproc=1, timeout=600)
    extra = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=0")
    plain = run(_cfg(tmp_path, "plain", *extra, "dpo.ref_cache=false"), nproc=2, timeout=600)
    assert plain["rank_reference_forwards"] == [4, 4]
    cold = run(_cfg(tmp_path, "cold", *extra), nproc=2, timeout=600, restart_step=2,
               restart_dir=tmp_path / "restart")
    assert cold["ref_cache"]["computed"] == 64 and cold["ref_cache"]["other_layout"] == 8
    assert cold["rank_reference_forwards"] == [4, 4]
    restart = cold["restart"]  # resumed at step 2 in fresh ranks: the cache answers every row
    assert restart["start_step"] == 2 and restart["rank_reference_forwards"] == [0, 0]
    assert len(restart["history"]) == 4
    _same({**restart, "adapter_dir": str(tmp_path / "restart" / "adapter")}, plain)
    warm = run(_cfg(tmp_path, "warm", *extra), nproc=2, timeout=600)
    assert warm["rank_reference_forwards"] == [0, 0] and warm["ref_cache"]["reused"] == 64
    _same(cold, plain)
    _same(warm, plain)
