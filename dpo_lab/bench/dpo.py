"""dpo_lab's FSDP + QLoRA DPO trainer against TRL's DPOTrainer: tokens/s and peak memory.

Same tiny 4-bit model, data, LoRA, micro-batch and steps. TRL runs in this process (single
process, as accelerate allows on CPU); dpo_lab runs through its launcher at world size 1 and 2.
The first steps are warm-up and are not timed; throughput is the median over steps of
non-padding tokens of the policy forward (chosen + rejected) per second. Peak memory is the peak RSS of the training process(es)
on CPU (it includes Python and the libraries), peak allocated bytes on a GPU.
"""
import statistics
import tempfile
import time

import torch

from dpo_lab.bench import Table

WARMUP = 2


def _trl(cfg, steps: int) -> dict:
    from transformers import TrainerCallback

    from dpo_lab.dpo.trainer import cpu_peak_rss
    from dpo_lab.dpo.trl_recipe import build_trainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, out)
        clock = Clock()
        trainer.add_callback(clock)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    # num_tokens is cumulative (attention-mask tokens of chosen + rejected); median over steps
    # because a shared machine adds spikes
    tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(logs, logs[1:])][WARMUP - 1:]
    seconds = [b - a for a, b in zip(clock.t, clock.t[1:])][WARMUP - 1:]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else cpu_peak_rss()
    return {"tokens_per_s": statistics.median(t / dt for t, dt in zip(tokens, seconds)),
            "peak_mem_mb": peak / 2**20, "final_loss": logs[-1]["loss"]}


def _ours(cfg, nproc: int) -> dict:
    from dpo_lab.dpo.trainer import run
    # each rank gets as many threads as TRL's process has
    res = run(cfg, nproc, timeout=1800, threads_per_rank=torch.get_num_threads())
    hist = res["history"][WARMUP:]
    return {"tokens_per_s": statistics.median(h["tokens"] / h["seconds"] for h in hist),
            "peak_mem_mb": max(res["rank_peak_memory_bytes"]) / 2**20,
            "final_loss": res["history"][-1]["loss"]}


def run(quick: bool = False):
    from dpo_lab.dpo.config import load_config
    from dpo_lab.paths import CONFIG_DIR
    steps = 6 if quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", updates={
            "train.max_steps": steps, "train.micro_batch": 16, "train.grad_accum": 1,
            "checkpoint.every": 0, "checkpoint.resume": False, "eval.max_rows": 16,
            "output_dir": out})
        th = torch.get_num_threads()
        rows.append({"variant": "trl_DPOTrainer", "world_size": 1, "threads": th, **_trl(cfg, steps)})
        rows.append({"variant": "dpo_lab_ws1", "world_size": 1, "threads": th, **_ours(cfg, 1)})
        # 2 ranks: same per-rank micro-batch, so twice the pairs per step
        rows.append({"variant": "dpo_lab_ws2", "world_size": 2, "threads": 2 * th, **_ours(cfg, 2)})
    return Table(title=f"DPO training throughput, tiny 4-bit model, {steps} steps "
                       f"(first {WARMUP} untimed), micro-batch 16 pairs/rank",
                 rows=rows, metric="tokens_per_s", baseline="trl_DPOTrainer", higher_is_better=True,
                 notes={"device": "cuda" if torch.cuda.is_available() else "cpu",
                        "memory": "peak RSS per process on CPU (libraries included)"})
