"""`dpo-lab bench dpo`: the large-vocabulary config, real-token counting, and the JSON's ratios.

One small run of the bench (3 steps, tiny micro-batches, no extra TRL variants) feeds the JSON
checks; nothing here asserts on a timing.
"""
import functools
import json
import math

import pytest

import dpo_lab.bench.dpo as bench_dpo
from dpo_lab.bench import run_bench


def test_large_vocab_config_has_qwen2_vocabulary():
    cfg = bench_dpo.large_vocab_config()
    assert cfg.vocab_size == 151_936
    saved = json.loads((bench_dpo.large_vocab_model_dir() / "config.json").read_text())
    assert saved["vocab_size"] == 151_936 and saved["hidden_size"] == bench_dpo.LARGE_VOCAB["hidden_size"]


def test_real_tokens_leaves_out_padding():
    from dpo_lab.dpo.batching import collate, encode_rows
    from dpo_lab.models import build_tokenizer
    tok = build_tokenizer()
    rows = bench_dpo.uneven_rows(6, seed=1)
    enc = encode_rows(tok, rows)
    batch = collate(enc, tok.pad_token_id, bench_dpo.MAX_LENGTH)
    # independent count: every sequence's own length (prompt + completion), before padding
    expected = sum(len(e["prompt_ids"]) + len(e[k]) for e in enc for k in ("chosen_ids", "rejected_ids"))
    assert batch["input_ids"].numel() > expected  # the rows are uneven: there is padding to leave out
    assert bench_dpo.real_tokens(batch["attention_mask"]) == expected


def test_tokens_per_s_counts_the_reference_precompute():
    # 2 steps of 100 tokens in 1 s each, plus 2 s of precompute shared by the 2 steps -> 50 tokens/s
    assert bench_dpo.tokens_per_s([100, 100], [1.0, 1.0], precompute_s=2.0, steps=2) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="as many token counts"):
        bench_dpo.tokens_per_s([1], [1.0, 2.0])


def test_options_are_read_from_the_config_it_has():
    from dpo_lab.dpo.config import TrainConfig
    cfg = TrainConfig()
    opts = bench_dpo.our_options(cfg)
    assert opts and set(opts) <= set(bench_dpo.FAST_PATHS)
    assert opts["dpo.precompute_ref"] is False
    # every switch the plain variant sets exists in the config and is a boolean that was on
    for key, value in bench_dpo.plain_updates(cfg).items():
        assert value is False and opts[key] is True


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    small = functools.partial(bench_dpo.run, steps=3, micro_batch={"tiny": 4, "large_vocab": 2},
                              trl_extras=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(bench_dpo, "run", lambda quick=False: small(quick=True))
    try:
        run_bench("dpo", quick=True, output_dir=out)
    finally:
        mp.undo()
    return json.loads((out / "bench" / "dpo.json").read_text())


def test_json_has_the_three_ratios_from_this_runs_rows(bench_json):
    table = bench_json["tables"][0]
    rows, figs = table["rows"], table["notes"]["figures"]
    assert set(figs) == set(bench_dpo.FIGURES)
    # the issue names these keys in build/bench/dpo.json itself, not only inside the table
    for key in ("tokens_per_s_ratio_vs_trl_large_vocab", "peak_mem_ratio_vs_trl_large_vocab",
                "tokens_per_s_ratio_vs_trl_tiny", "peak_above_load_ratio_vs_trl_large_vocab"):
        assert bench_json[key] == figs[key], key

    def row(config, variant):
        (r,) = [r for r in rows if r["config"] == config and r["variant"] == variant]
        return r
    for key, (config, metric) in bench_dpo.FIGURES.items():
        ours, trl = row(config, "dpo_lab_default"), row(config, "trl_default")
        assert math.isfinite(figs[key]) and figs[key] > 0, key
        assert figs[key] == pytest.approx(ours[metric] / trl[metric], rel=1e-12), key
    assert figs["tokens_per_s_ratio_vs_trl_tiny"] == pytest.approx(
        row("tiny", "dpo_lab_default")["ratio_vs_trl_default"])
    # our rows say which of the trainer's fast paths were on
    assert "dpo.precompute_ref" in row("large_vocab", "dpo_lab_default")["options"]


def test_bench_counts_real_tokens_not_padded_slots(bench_json):
    rows = bench_json["tables"][0]["rows"]
    for r in rows:
        if r["variant"].startswith("trl"):
            assert 0 < r["tokens_per_step"] < r["slots_per_step"], r
    # both trainers see the same rows, so the same real tokens per step (up to which rows a step draws)
    for config in ("tiny", "large_vocab"):
        ours, trl = ([r["tokens_per_step"] for r in rows if r["config"] == config and r["variant"] == v][0]
                     for v in ("dpo_lab_default", "trl_default"))
        assert 0.5 < ours / trl < 2.0, (config, ours, trl)


def test_peak_memory_is_reported_above_the_loaded_model_too(bench_json):
    table = bench_json["tables"][0]
    assert set(table["notes"]["memory"]) >= {"peak_mem_mb", "peak_above_load_mb", "ratio_keys"}
    for r in table["rows"]:
        # the baseline (libraries + loaded model) is a real part of the process peak, not 0 or all of it
        assert 0 < r["peak_above_load_mb"] < r["peak_mem_mb"] - 100, r
        assert r["peak_above_load_ratio_vs_trl_default"] == pytest.approx(
            r["peak_above_load_mb"] / [t for t in table["rows"] if t["config"] == r["config"]
                                       and t["variant"] == "trl_default"][0]["peak_above_load_mb"])


def test_top_level_figures_never_overwrite_the_json_keys(monkeypatch, tmp_path):
    from dpo_lab.bench import Table
    clash = Table(title="t", rows=[{"variant": "a", "x": 1.0}], metric="x", baseline="a",
                  notes={"figures": {"machine": 2.0}})
    monkeypatch.setattr(bench_dpo, "run", lambda quick=False: clash)
    with pytest.raises(ValueError, match="'machine'.*clashes"):
        run_bench("dpo", quick=True, output_dir=tmp_path)


def test_default_packing_keeps_rows_within_max_length():
    """The tiny config's speed: attention costs L² per packed row, so the default packs rows of
    data.max_length (first fit), not one row of the whole micro-batch."""
    from dpo_lab.dpo.batching import encode_rows, layout
    from dpo_lab.dpo.config import DataConfig
    from dpo_lab.models import build_tokenizer
    tok = build_tokenizer()
    enc = encode_rows(tok, bench_dpo.uneven_rows(16, seed=2))
    data = DataConfig(max_length=bench_dpo.MAX_LENGTH)
    assert data.packing and data.max_tokens_per_row is None
    batch = layout(enc, tok.pad_token_id, data)
    rows, width = batch["input_ids"].shape
    assert width <= bench_dpo.MAX_LENGTH and rows > 1
    # first fit into rows of max_length leaves little filler: fewer slots than padding would take
    assert batch["real_tokens"] <= rows * width < 32 * max(len(e["prompt_ids"]) + len(e[k]) for e in enc
                                                           for k in ("chosen_ids", "rejected_ids"))
    # an explicit row length still wins
    wide = layout(enc, tok.pad_token_id, DataConfig(max_length=bench_dpo.MAX_LENGTH, max_tokens_per_row=4096))
    assert wide["input_ids"].shape[0] == 1
