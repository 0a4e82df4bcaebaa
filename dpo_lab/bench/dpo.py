"""dpo_lab's FSDP + QLoRA DPO trainer against TRL's DPOTrainer: tokens/s and peak memory, one run.

`dpo-lab bench dpo [--quick]`. Two model configs, same 4-bit base recipe, data, LoRA, micro-batch
and steps for every variant:

- **tiny**: the workbook's SFT model (character tokenizer, vocabulary of ~100);
- **large_vocab**: Qwen2-0.5B's vocabulary (151,936) on a small random body, so that the
  [tokens, vocabulary] logits dominate as in real models. It keeps the project's character
  tokenizer with the embedding resized to 151,936 rows (ids above ~100 never occur in the data,
  but every position is still projected onto, and normalised over, all 151,936 entries, which is
  what costs memory and time).

Both read the same rows: random characters with uneven prompt and completion lengths
(`uneven_rows`), so that a padded micro-batch carries padding, as real preference data does.

Variants: TRL's `DPOTrainer` as `dpo_lab.dpo.trl_recipe` sets it up (`trl_default`), then with each
of its memory options that works on a CPU in TRL 1.16 (`precompute_ref_log_probs`, activation
checkpointing); dpo_lab's trainer with its config defaults (the fast paths that are on are
recorded in the row), with those switched off (`dpo_lab_plain`, when the config has any) and with
its reference precompute. TRL's `padding_free` is disabled in TRL 1.16 (it warns and pads) and
`activation_offloading` moves activations from a GPU to the CPU, so neither is a CPU variant.

Every variant runs in a fresh process (peak RSS is a per-process high-water mark). The first
WARMUP steps are not timed; tokens/s is the median over the timed steps of real (attention-mask)
tokens of chosen + rejected per second, where a step's seconds include its share of the time spent
precomputing reference log-probs. Peak memory two ways (MEMORY): the peak RSS of the training process
on CPU (Python and libraries included; peak allocated bytes on a GPU), and that peak minus what the
process holds once the model is loaded (what training itself adds). Tensor-level peaks of each piece
(logits, padding, reference forward) are `dpo_lab.bench.dpo_memory.pieces`.
"""
import statistics
import tempfile
import time

import torch

from dpo_lab.bench import Table

WARMUP = 2

# Qwen/Qwen2-0.5B config.json (huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json):
# vocab_size 151936, hidden_size 896, intermediate_size 4864, num_hidden_layers 24,
# num_attention_heads 14, num_key_value_heads 2, rope_theta 1e6, tie_word_embeddings true.
# We keep its vocabulary, tied head and GQA ratio, and shrink the body to run on a CPU.
QWEN2_0_5B_VOCAB = 151_936
LARGE_VOCAB = dict(vocab_size=QWEN2_0_5B_VOCAB, hidden_size=128, intermediate_size=384,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   rope_theta=1_000_000.0, tie_word_embeddings=True)

MAX_LENGTH = 48  # prompt + completion tokens

# dpo_lab trainer options that trade work or memory; read defensively (they land in other branches)
FAST_PATHS = ("dpo.chunked_logps", "data.packing", "dpo.ref_cache", "dpo.precompute_ref")

# the three ratios (ours / TRL's default), top-level keys of build/bench/dpo.json; the memory
# ratio is on process peak RSS (MEMORY), the one above the loaded model is reported alongside
FIGURES = {"tokens_per_s_ratio_vs_trl_large_vocab": ("large_vocab", "tokens_per_s"),
           "peak_mem_ratio_vs_trl_large_vocab": ("large_vocab", "peak_mem_mb"),
           "tokens_per_s_ratio_vs_trl_tiny": ("tiny", "tokens_per_s"),
           "peak_above_load_ratio_vs_trl_large_vocab": ("large_vocab", "peak_above_load_mb")}
MEMORY = {"peak_mem_mb": "peak RSS of the training process (VmHWM; libraries, model and data included); "
                         "on a GPU max_memory_allocated",
          "peak_above_load_mb": "peak_mem_mb minus the memory held once the model is loaded, before any "
                                "training (VmRSS on CPU, memory_allocated on a GPU): ours right after "
                                "build_policy, TRL's on entering DPOTrainer.__init__ with the loaded model",
          "ratio_keys": "peak_mem_ratio_vs_trl_large_vocab uses peak_mem_mb; "
                        "peak_above_load_ratio_vs_trl_large_vocab uses peak_above_load_mb"}
OURS, THEIRS = "dpo_lab_default", "trl_default"


def large_vocab_config():
    from dpo_lab.models import tiny_config
    return tiny_config("qwen2", **LARGE_VOCAB)


def large_vocab_model_dir(seed: int = 0):
    """A random-weight model with LARGE_VOCAB and the project's tokenizer, saved once in the cache
    (both trainers load models from a directory)."""
    import hashlib
    import os
    import shutil

    from dpo_lab.models import build_tokenizer
    from dpo_lab.paths import cache_dir
    from transformers import Qwen2ForCausalLM
    tag = "-".join(f"{k}{v}" for k, v in sorted(LARGE_VOCAB.items()))
    out = cache_dir() / "models" / f"bench-large-vocab-{seed}-{hashlib.sha256(tag.encode()).hexdigest()[:10]}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(large_vocab_config())
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer().save_pretrained(tmp)
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a half-written model is never picked up
    else:
        shutil.rmtree(tmp)
    return out


def uneven_rows(n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> list[dict]:
    """Preference rows of random characters with uneven prompt and completion lengths (so a
    padded batch is mostly padding past its shortest row); each fits max_length with EOS."""
    import random
    import string
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(k))
    rows = []
    for _ in range(n):
        p = rng.randint(2, max_length // 3)
        chosen, rejected = (rng.randint(1, max_length - p - 1) for _ in range(2))
        rows.append({"prompt": text(p), "chosen": text(chosen), "rejected": text(rejected) + "!"})
    return rows


def real_tokens(attention_mask) -> int:
    """Tokens that are not padding: the attention mask's ones (padding slots are zeros)."""
    return int(attention_mask.sum())


def tokens_per_s(tokens: list, seconds: list, precompute_s: float = 0.0, steps: int | None = None) -> float:
    """Median over steps of tokens / (step seconds + the step's share of the reference precompute)."""
    if not tokens or len(tokens) != len(seconds):
        raise ValueError(f"need as many token counts as step times, got {len(tokens)} and {len(seconds)}")
    share = precompute_s / (steps or len(tokens))
    return statistics.median(t / (s + share) for t, s in zip(tokens, seconds))


def our_options(cfg) -> dict:
    """{'section.key': value} of the FAST_PATHS this config has (missing ones are left out)."""
    out = {}
    for key in FAST_PATHS:
        sec, name = key.split(".")
        section = getattr(cfg, sec, None)
        if hasattr(section, name):
            out[key] = getattr(section, name)
    return out


def _peak_bytes() -> int:
    from dpo_lab.dpo.trainer import cpu_peak_rss
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else cpu_peak_rss()


def _now_bytes() -> int:
    from dpo_lab.dpo.trainer import memory_now_bytes
    return memory_now_bytes(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _trl_child(cfg_dict: dict, steps: int) -> dict:
    """One TRL run in this (fresh) process: per-step real tokens, padded slots, seconds, peak."""
    import logging
    import warnings

    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import DPOTrainer

    from dpo_lab.dpo.config import from_dict
    from dpo_lab.dpo.trl_recipe import build_trainer
    warnings.simplefilter("ignore")
    disable_progress_bar()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars; the bench prints its own table
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = from_dict(cfg_dict)
    pre = {"s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):  # TRL precomputes inside __init__: time it alone
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            pre["s"] += time.perf_counter() - t0
    DPOTrainer._precompute_ref_logps = timed
    init, loaded = DPOTrainer.__init__, {}

    def init_after_load(self, *a, **kw):  # the model is loaded (an argument), training not begun
        loaded.setdefault("bytes", _now_bytes())
        return init(self, *a, **kw)
    DPOTrainer.__init__ = init_after_load

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.begin)

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, out)
        tokens, slots = [], []
        step = trainer.training_step

        def counting_step(model, inputs, *a, **kw):  # grad_accum 1: one call per optimizer step
            tokens.append(real_tokens(inputs["attention_mask"]))
            slots.append(int(inputs["input_ids"].numel()))
            return step(model, inputs, *a, **kw)
        trainer.training_step = counting_step
        clock = Clock()
        trainer.add_callback(clock)
        for cb in (ProgressCallback, PrinterCallback):  # the bench prints its own table
            trainer.remove_callback(cb)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "slots": slots, "seconds": clock.seconds, "precompute_s": pre["s"],
            "peak_bytes": _peak_bytes(), "load_bytes": loaded["bytes"],
            "final_loss": logs[-1]["loss"] if logs else None}


def _in_fresh_process(fn, *args):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result(timeout=1800)


def _trl(cfg, steps: int) -> dict:
    r = _in_fresh_process(_trl_child, cfg.to_dict(), steps)
    n = min(len(r["tokens"]), len(r["seconds"]))
    tok, sec = r["tokens"][WARMUP:n], r["seconds"][WARMUP:n]
    return {"tokens_per_s": tokens_per_s(tok, sec, r["precompute_s"], steps),
            "peak_mem_mb": r["peak_bytes"] / 2**20,
            "peak_above_load_mb": (r["peak_bytes"] - r["load_bytes"]) / 2**20,
            "tokens_per_step": statistics.mean(tok),
            "slots_per_step": statistics.mean(r["slots"][WARMUP:n]), "precompute_s": r["precompute_s"],
            "final_loss": r["final_loss"]}


def _ours(cfg, nproc: int, steps: int) -> dict:
    from dpo_lab.dpo.trainer import run
    # each rank gets as many threads as TRL's process has
    res = run(cfg, nproc, timeout=1800, threads_per_rank=torch.get_num_threads())
    hist = res["history"][WARMUP:]
    # the time the trainer spent precomputing (or reading cached) reference log-probs: counted
    pre = res.get("ref_precompute_seconds") or res.get("phase_seconds", {}).get("ref_precompute", 0.0)
    return {"tokens_per_s": tokens_per_s([h["tokens"] for h in hist], [h["seconds"] for h in hist], pre, steps),
            "peak_mem_mb": max(res["rank_peak_memory_bytes"]) / 2**20,
            "peak_above_load_mb": max(p - b for p, b in zip(res["rank_peak_memory_bytes"],
                                                            res["rank_memory_after_load_bytes"])) / 2**20,
            "tokens_per_step": statistics.mean(h["tokens"] for h in hist), "precompute_s": pre,
            "final_loss": res["history"][-1]["loss"]}


def _load(model: str, steps: int, micro_batch: int, out: str, pairs: int, **updates):
    import json
    import tempfile
    from pathlib import Path

    from dpo_lab.dpo.config import load_config
    from dpo_lab.paths import CONFIG_DIR
    data = Path(out) / "uneven.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in uneven_rows(max(pairs, 1024))))
    return load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", updates={
        "model.name": model, "data.source": str(data), "data.max_length": MAX_LENGTH,
        "train.max_steps": steps, "train.micro_batch": micro_batch,
        "train.grad_accum": 1, "checkpoint.every": 0, "checkpoint.resume": False,
        "eval.max_rows": 8, "data.max_rows": pairs, "output_dir": out,
        # a cold reference cache every time: the precompute is paid and counted, as in a single
        # run (a warm one, e.g. in a β sweep, would skip the reference forward entirely)
        "dpo.ref_cache_dir": tempfile.mkdtemp(prefix="ref-cache-", dir=out), **updates})


def plain_updates(cfg) -> dict:
    """Config updates that switch off every boolean fast path that is on ({} when none is)."""
    return {k: False for k, v in our_options(cfg).items() if v is True}


def variants(cfg, world_sizes=(1,), trl_extras: bool = True) -> list[tuple[str, str, int, dict]]:
    """(name, trainer, world size, config updates) of one model config."""
    out = [(THEIRS, "trl", 1, {})]
    if trl_extras:
        out += [("trl_precompute_ref", "trl", 1, {"dpo.precompute_ref": True}),
                ("trl_checkpointing", "trl", 1, {"model.gradient_checkpointing": True})]
    out.append((OURS, "dpo_lab", 1, {}))
    if plain_updates(cfg):
        out.append(("dpo_lab_plain", "dpo_lab", 1, plain_updates(cfg)))
    if trl_extras and not our_options(cfg).get("dpo.precompute_ref"):
        out.append(("dpo_lab_precompute_ref", "dpo_lab", 1, {"dpo.precompute_ref": True}))
    out += [(f"dpo_lab_ws{ws}", "dpo_lab", ws, {}) for ws in world_sizes if ws > 1]
    return out


def figures(rows: list[dict]) -> dict:
    """The issue's three ratios, from rows measured in this run (None if a row is missing)."""
    def value(config, variant, metric):
        hit = [r[metric] for r in rows if r["config"] == config and r["variant"] == variant]
        return hit[0] if hit else None
    out = {}
    for key, (config, metric) in FIGURES.items():
        ours, theirs = value(config, OURS, metric), value(config, THEIRS, metric)
        out[key] = ours / theirs if ours is not None and theirs else None
    return out


def run(quick: bool = False, steps: int | None = None, micro_batch: dict | None = None,
        trl_extras: bool = True):
    """Both configs, every variant, one Table with a row per (config, variant) and the ratios.
    `steps` and `micro_batch` ({config: pairs}) shrink the run for tests."""
    from dpo_lab.dpo.qlora import resolve_model
    steps = steps or (6 if quick else 20)
    mb = {"tiny": 16, "large_vocab": 4 if quick else 8, **(micro_batch or {})}
    models = {"tiny": resolve_model("tiny-sft"), "large_vocab": str(large_vocab_model_dir())}
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for config, model in models.items():
            # 2 ranks take twice the pairs per step; every trainer sees the first `pairs` rows
            ws = (1, 2) if config == "tiny" and not quick else (1,)
            base = _load(model, steps, mb[config], out, steps * mb[config] * max(ws))
            # --quick: the memory-option variants only where memory matters (the large vocabulary)
            extras = trl_extras and (config == "large_vocab" or not quick)
            for name, trainer, nproc, updates in variants(base, ws, extras):
                cfg = _load(model, steps, mb[config], out, steps * mb[config] * max(ws), **updates)
                print(f"[bench dpo] {config} {name} ...", flush=True)
                m = _trl(cfg, steps) if trainer == "trl" else _ours(cfg, nproc, steps)
                rows.append({"config": config, "variant": name, "world_size": nproc,
                             "micro_batch": mb[config], **m,
                             "options": {k: v for k, v in updates.items()} if trainer == "trl"
                             else our_options(cfg)})
    for metric in ("peak_mem_mb", "peak_above_load_mb"):
        base = {r["config"]: r[metric] for r in rows if r["variant"] == THEIRS}
        for r in rows:
            r[f"{metric[:-3]}_ratio_vs_trl_default"] = r[metric] / base[r["config"]]
    table = Table(title=f"DPO training, dpo_lab vs TRL, {steps} steps (first {WARMUP} untimed); "
                        f"micro-batch pairs/rank {mb}",
                  rows=rows, metric="tokens_per_s", baseline=THEIRS, group_by=("config",),
                  higher_is_better=True,
                  notes={"device": "cuda" if torch.cuda.is_available() else "cpu",
                         "memory": MEMORY,
                         "large_vocab": {**LARGE_VOCAB, "source": "Qwen/Qwen2-0.5B config.json (vocabulary); "
                                         "small random body; project character tokenizer, resized embedding"},
                         "tokens": "real (attention-mask) tokens of chosen + rejected per step; "
                                   "reference precompute time is spread over the steps",
                         "trl_not_run": {"padding_free": "disabled in TRL 1.16 (falls back to padding)",
                                         "activation_offloading": "offloads GPU activations to CPU",
                                         "use_liger_kernel": "needs liger-kernel (Triton, GPU)"},
                         "targets": {"tokens_per_s_ratio_vs_trl_large_vocab": ">= 1.2",
                                     "peak_mem_ratio_vs_trl_large_vocab": "<= 0.5",
                                     "tokens_per_s_ratio_vs_trl_tiny": ">= 1.0"}})
    table.with_ratios()
    table.notes["figures"] = figures(rows)
    return table
