"""DPO with a 4-bit base sharded by FSDP2 and LoRA adapters on top (or, with train.finetune=full,
every parameter of the unquantised model trained): one loop, 1 to N ranks.

    dpo-lab train dpo --config configs/dpo/tiny_cpu.yaml --nproc 2 train.max_steps=20
    torchrun --nproc-per-node 8 -m dpo_lab.dpo.trainer --config configs/dpo/llama3_8b_8gpu.yaml

Each optimizer step: every rank takes its micro-batches of the global batch, runs chosen and
rejected through ONE forward (policy), gets the reference log-probs from the same model with the
adapters disabled (by default from the reference cache: dpo_lab/dpo/ref_cache.py, computed
once per micro-batch before step 1 and kept on disk), and backpropagates the DPO loss divided by the
global batch so that FSDP's gradient averaging over ranks yields the global mean.
Full fine-tuning has no adapters to switch off: its reference is the model before the first update,
so the reference log-probs (training micro-batches and held-out rows) are computed then, before a
resumed run loads its checkpoint's weights; the config refuses it without dpo.ref_cache/precompute_ref.
By default a micro-batch is packed rows without padding (data.packing, dpo_lab.dpo.packing) and only
the completion positions' hidden states reach the LM head, in chunks (dpo.chunked_logps,
dpo_lab.dpo.logprobs); padded rows with full fp32 logits remain as the reference path.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dpo_lab.dpo import checkpoint as ckpt
from dpo_lab.dpo.batching import BatchPlan, EncodedRows, encode_rows, layout, real_tokens, to_device
from dpo_lab.dpo.config import ConfigError, TrainConfig, from_dict, load_config
from dpo_lab.dpo.evaluate import evaluate_preferences, reference_scores

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def load_data(cfg: TrainConfig, tokenizer):
    """Training and held-out rows (strings); an invalid row raises before any model is built."""
    from dpo_lab.data import load_preferences
    train = load_preferences(cfg.data.source, split=cfg.data.split, tokenizer=tokenizer,
                             max_length=cfg.data.max_length, drop_invalid=cfg.data.drop_invalid).rows
    if cfg.data.max_rows:
        train = train[:cfg.data.max_rows]
    held = load_preferences(cfg.data.source, split=cfg.data.eval_split, tokenizer=tokenizer,
                            max_length=cfg.data.max_length, drop_invalid=True).rows
    if cfg.eval.max_rows:
        held = held[:cfg.eval.max_rows]
    return train, held


def total_steps(cfg: TrainConfig, plan: BatchPlan) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, int(cfg.train.epochs * plan.steps_per_epoch))


def build_policy(cfg: TrainConfig, device):
    """4-bit base + LoRA (or, train.finetune=full, the whole unquantised model trainable), sharded
    over all ranks (a mesh of 1 at world size 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dpo_lab.dpo.qlora import add_lora, full_finetune, load_quantized, shard
    model, tok = load_quantized(cfg.model, cfg.quant, device)
    if cfg.train.finetune == "full":
        model = full_finetune(model, cfg.model.gradient_checkpointing)
    else:
        model = add_lora(model, cfg.lora, cfg.model.gradient_checkpointing, seed=cfg.train.seed)
    import warnings
    # When the embedding's output requires grad (full fine-tuning; checkpointing's
    # enable_input_require_grads) the root's outputs include it as hidden_states[0], a view:
    # FSDP warns against in-place ops on it. We only read hidden_states[-1]
    # (logprobs._last_hidden_state), so the warning does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor",
                            category=UserWarning)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return shard(model, mesh, cfg.fsdp), tok


def logps_path(batch: dict, cfg: TrainConfig) -> dict:
    """The batch, told how its log-probs are computed: `logps_chunk_size` is the chunked head's
    chunk (dpo.chunked_logps) or None for full logits. It travels with the batch so that every
    consumer (policy, reference, a precomputed reference table) scores it the same way."""
    d = cfg.dpo
    return {**batch, "logps_chunk_size": d.logps_chunk_size if d.chunked_logps else None}


def micro_batch(examples: list[dict], cfg: TrainConfig, pad_id: int) -> dict:
    """Encoded pairs -> one micro-batch in the configured layout: packed rows without padding
    (data.packing) or `collate`'s padded (2B, T) rows."""
    return logps_path(layout(examples, pad_id, cfg.data), cfg)


def policy_forward(model, batch, ld_alpha=None):
    """One forward over a micro-batch (padded or packed; see `logps_path` for how its log-probs are
    computed) -> (chosen, rejected, logit sums and completion lengths, plain chosen sums): the logit
    sums are behind TRL's `logits/*` metrics, the plain chosen sums are what the `sft` loss averages
    (with `ld_alpha` the others are LD-DPO sums)."""
    from dpo_lab.dpo.logprobs import sequence_terms
    from dpo_lab.dpo.loss import completion_logit_sums, sequence_logps
    chunk = batch.get("logps_chunk_size")
    if chunk is not None or "seq_id" in batch:
        return sequence_terms(model, batch, chunk, ld_alpha)
    # padded rows, full fp32 logits: the plain path, kept as the reference of the others
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits.float()
    ids, mask = batch["input_ids"], batch["loss_mask"]
    pc, pr = sequence_logps(logits, ids, mask, ld_alpha=ld_alpha).chunk(2)
    plain_chosen = pc if ld_alpha is None else sequence_logps(logits, ids, mask).chunk(2)[0]
    return pc, pr, completion_logit_sums(logits, mask), plain_chosen


def dpo_step_terms(model, batch, cfg: TrainConfig, ref=None):
    """Policy + reference log-probs of one micro-batch and the per-pair DPO terms:
    (losses, chosen rewards, rejected rewards, policy chosen, policy rejected, logit sums),
    the arguments of `dpo_metrics`."""
    from dpo_lab.dpo.loss import dpo_loss
    d = cfg.dpo
    batch = logps_path(batch, cfg)
    if ref is None and not hasattr(model, "disable_adapter"):
        # full fine-tuning: the model now is not the reference (it has been updated)
        raise ValueError("dpo_step_terms: a model without LoRA adapters needs `ref`, the reference "
                         "log-probs computed before training (dpo.ref_cache / dpo.precompute_ref)")
    pc, pr, logit_sums, plain_chosen = policy_forward(model, batch, d.ld_alpha)
    if ref is None:
        ref = reference_logps(model, batch, d.ld_alpha)
    # completion lengths: TRL's ipo and sigmoid_norm use per-token means, sft a token mean
    n_c, n_r = logit_sums[1].chunk(2)
    losses, cr, rr = dpo_loss(pc, pr, ref[0], ref[1], beta=d.beta, loss_type=d.loss_type,
                              label_smoothing=d.label_smoothing, chosen_lengths=n_c, rejected_lengths=n_r,
                              loss_weights=d.loss_weights, f_divergence_type=d.f_divergence_type,
                              f_alpha_divergence_coef=d.f_alpha_divergence_coef, discopop_tau=d.discopop_tau,
                              sft_chosen_logps=plain_chosen)
    return losses, cr, rr, pc, pr, logit_sums


REFERENCE_FORWARDS = 0  # calls of reference_logps in this process; a run reports how many it made


@torch.no_grad()
def reference_logps(model, batch, ld_alpha=None):
    """The reference policy = the same weights with the LoRA adapters switched off, scored as the
    policy is (same layout and head path; LD-DPO sums with `ld_alpha`). A model without adapters
    (full fine-tuning) is scored as it is: the reference only before its first update."""
    global REFERENCE_FORWARDS
    REFERENCE_FORWARDS += 1
    if not hasattr(model, "disable_adapter"):
        return policy_forward(model, batch, ld_alpha)[:2]
    with model.disable_adapter():
        return policy_forward(model, batch, ld_alpha)[:2]


def reference_table(cfg: TrainConfig, model, tok, rows, plan: BatchPlan, steps, device):
    """Collective: {(step, j): (ref chosen, ref rejected)} for this rank's micro-batches of `steps`,
    read from the disk cache (cfg.dpo.ref_cache) where the very same micro-batch was scored before,
    computed now where not (ref_cache.py: reuse is bitwise exact), and the stats."""
    from dpo_lab.dpo import ref_cache
    from dpo_lab.dpo.qlora import resolve_model
    from dpo_lab.paths import cache_dir
    rank = dist.get_rank()
    names = [(s, j) for s in steps for j, _ in enumerate(plan.micro_indices(s, rank))]
    micro = [plan.micro_indices(s, rank)[j] for s, j in names]
    cache = None
    if cfg.dpo.ref_cache and rank == 0:  # rank 0 alone reads and writes the cache
        inputs = ref_cache.fingerprint_inputs(cfg, resolve_model(cfg.model.name), tok, device.type)
        cache = ref_cache.RefCache(cfg.dpo.ref_cache_dir or cache_dir(), inputs)
    model.train()  # the mode the training loop scores the reference in

    def build(idx):
        return to_device(micro_batch([rows[i] for i in idx], cfg, tok.pad_token_id), device)  # as in training
    values, stats = ref_cache.precompute(
        cache, micro, build, lambda batch: reference_logps(model, batch, cfg.dpo.ld_alpha),
        {i: ref_cache.row_key(rows[i]) for idx in micro for i in idx}, ref_cache.environment(device))
    return dict(zip(names, values)), stats


def _sums(losses, cr, rr, pc, pr, logit_sums) -> torch.Tensor:
    """Per-micro-batch sums of every logged metric (averaged over the global batch later):
    the METRICS, the pair count, then logit sum and token count of chosen and of rejected."""
    (sum_c, sum_r), (n_c, n_r) = (t.chunk(2) for t in logit_sums)
    return torch.stack([losses.detach().sum(), cr.sum(), rr.sum(), (cr - rr).sum(),
                        (cr > rr).float().sum(), pc.detach().sum(), pr.detach().sum(),
                        torch.tensor(float(len(losses)), device=losses.device),
                        sum_c.sum(), n_c.sum(), sum_r.sum(), n_r.sum()]).double().cpu()


def _all_true(flag: bool, device) -> bool:
    """Collective: True on every rank iff `flag` is True on every rank (a decision all ranks share)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return cpu_peak_rss()


def memory_now_bytes(device) -> int:
    """Memory held right now: allocated bytes on a GPU, resident set (VmRSS) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_peak_rss() -> int:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited from
    the parent that spawned the rank)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_rank(cfg_dict: dict) -> dict:
    """The whole run on one rank (torch.distributed is initialised). Returns what the caller
    needs: rank 0 returns history, evaluation and memory; other ranks their memory report."""
    from transformers import AutoTokenizer, get_scheduler

    from dpo_lab.dpo.qlora import memory_report, resolve_model
    from dpo_lab.parallel import rank_device
    cfg = from_dict(cfg_dict)
    rank, ws, device = dist.get_rank(), dist.get_world_size(), rank_device()
    clock, t_mark = {}, time.perf_counter()

    def lap(name):  # seconds spent in each phase, returned with the result
        nonlocal t_mark
        now = time.perf_counter()
        clock[name] = clock.get(name, 0.0) + now - t_mark
        t_mark = now
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train_rows, held_rows = load_data(cfg, tok)
    train_rows, held_rows = EncodedRows(tok, train_rows), encode_rows(tok, held_rows)
    plan = BatchPlan(len(train_rows), cfg.train.micro_batch, cfg.train.grad_accum, ws, cfg.train.seed)
    steps = total_steps(cfg, plan)

    lap("data")
    model, _ = build_policy(cfg, device)
    full = cfg.train.finetune == "full"
    memory = memory_report(model)
    load_bytes = memory_now_bytes(device)  # the bench's baseline: libraries + loaded model
    lap("load_and_shard")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = get_scheduler(cfg.train.schedule, opt, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * steps),
                          num_training_steps=steps)
    pad_id = tok.pad_token_id

    start, history = 0, []
    root = out / "checkpoints"
    if not cfg.checkpoint.resume and rank == 0 and root.exists():
        import shutil
        shutil.rmtree(root)  # a fresh run: never mix in checkpoints of an earlier one
    dist.barrier()
    # Rank 0 picks the checkpoint and every rank follows it: ranks choosing on their own could
    # disagree (node-local disks, a save still landing) and then run different steps and hang.
    found = ckpt.latest(root) if cfg.checkpoint.resume and rank == 0 else None
    pick = [found.name if found is not None else None]
    dist.broadcast_object_list(pick, src=0)
    last = root / pick[0] if pick[0] else None
    if last is not None and not (last / "trainer_state.json").exists():
        raise FileNotFoundError(f"rank {rank}: rank 0 resumes from {last}, which this rank cannot read")
    eval_before = None
    fingerprint = {k: cfg_dict[k] for k in ("model", "data", "quant", "lora", "dpo", "train")}
    if last is not None:
        saved = json.loads((last / "trainer_state.json").read_text())
        changed = [f"{sec}.{k}" for sec in fingerprint for k in fingerprint[sec]
                   if saved.get("config", fingerprint).get(sec, {}).get(k) != fingerprint[sec][k]]
        if changed:
            raise ConfigError(f"{last} was written with different settings ({', '.join(changed)}); "
                              f"use another output_dir or checkpoint.resume=false")
        start = saved["step"]

    end = min(steps, cfg.debug.stop_after or steps)
    forwards_before = REFERENCE_FORWARDS
    ref_of, ref_stats, held_ref = None, None, None

    def references():  # then training runs no reference forward
        nonlocal ref_of, ref_stats
        if cfg.dpo.ref_cache or cfg.dpo.precompute_ref:
            ref_of, ref_stats = reference_table(cfg, model, tok, train_rows, plan, range(start, end), device)
        lap("ref_precompute")
    if full:
        # The model is the reference only while it holds its initial weights: score the reference
        # before the first update and before a checkpoint's weights are loaded.
        references()
        held_ref = reference_scores(model, held_rows, cfg, device)
    if last is not None:
        state = ckpt.load(last, model, opt)
        sched.load_state_dict(state["scheduler"])
        history, eval_before = state["history"], state.get("eval_before")
    lap("resume")
    if eval_before is None:
        eval_before = evaluate_preferences(model, held_rows, cfg, device, held_ref)
    lap("eval")
    if not full:
        references()  # the adapters-off reference does not depend on the loaded adapters

    def micro_batches(step):
        return [(idx, to_device(micro_batch([train_rows[i] for i in idx], cfg, pad_id), device))
                for idx in plan.micro_indices(step, rank)]

    def reference(step, j):
        if ref_of is None:
            return None  # dpo_step_terms runs the reference forward
        return tuple(t.to(device) for t in ref_of[(step, j)])

    log_file = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.dumps())
        with open(log_file, "w") as f:  # rewritten on resume: only the kept history
            for rec in history:
                f.write(json.dumps(rec) + "\n")
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=f"DPO ws={ws}", mininterval=1, file=sys.stderr)
    global_batch = plan.global_batch
    model.train()
    # asynchronous checkpoints: DCP's writer thread talks on a group of its own (see ckpt.save)
    async_ckpt = cfg.checkpoint.async_save
    ckpt_group = dist.new_group(backend="gloo") if async_ckpt else None
    pending, save_blocked = None, []  # the save in flight; seconds each save held training up
    lap("setup")
    t_run = time.perf_counter()
    tokens_run = 0
    for step in range(start, end):
        t0 = time.perf_counter()
        sums = torch.zeros(12, dtype=torch.float64)
        tokens = 0
        for j, (idx, batch) in enumerate(micro_batches(step)):
            if hasattr(model, "set_requires_gradient_sync"):  # reduce-scatter on the last micro only
                model.set_requires_gradient_sync(j == cfg.train.grad_accum - 1)
            terms = dpo_step_terms(model, batch, cfg, reference(step, j))
            # / global batch: FSDP averages over ranks, so x world size restores the global mean.
            (terms[0].sum() * ws / global_batch).backward()
            sums += _sums(*terms)
            tokens += real_tokens(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sums = _all_reduce(torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64)]), device)
        n = sums[7].item()
        rec = {"step": step + 1, **{k: sums[i].item() / n for i, k in enumerate(METRICS)},
               "logits/chosen": sums[8].item() / max(sums[9].item(), 1),
               "logits/rejected": sums[10].item() / max(sums[11].item(), 1),
               "grad_norm": float(grad_norm), "learning_rate": lr, "tokens": int(sums[12].item()),
               "seconds": time.perf_counter() - t0}
        tokens_run += rec["tokens"]
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < end:
            rec.update({f"eval/{k}": v for k, v in evaluate_preferences(model, held_rows, cfg, device,
                                                                         held_ref).items()})
        history.append(rec)
        if rank == 0:
            with open(log_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", margin=f"{rec['rewards/margins']:.3f}",
                                acc=f"{rec['rewards/accuracies']:.2f}", refresh=False)
            bar.update(1)
        done = step + 1
        if pending is not None and _all_true(pending.done(), device):
            pending.finish()  # every rank has written it: complete it now
            pending = None
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == end:
            crash = None
            if cfg.debug.crash_while_saving == done:
                crash = lambda: os._exit(1)  # noqa: E731  (simulated power cut mid-save)
            if pending is not None:
                pending.finish()  # one save in flight at a time
                pending = None
            t_save = time.perf_counter()
            pending = ckpt.save(root, done, model, opt, {"step": done, "scheduler": sched.state_dict(),
                                                         "config": fingerprint,
                                                         "history": history, "eval_before": eval_before,
                                                         "world_size": ws, "data_position": done * global_batch},
                                keep=cfg.checkpoint.keep, crash_hook=crash, asynchronous=async_ckpt,
                                process_group=ckpt_group)
            save_blocked.append(time.perf_counter() - t_save)
            if not async_ckpt:
                pending = None
        if cfg.debug.crash_at_step == done:
            os._exit(1)  # simulated crash: no cleanup, like a killed job
    if pending is not None:
        pending.finish()  # never exit with a checkpoint half written
    if bar is not None:
        bar.close()
    run_seconds = time.perf_counter() - t_run
    lap("train")
    eval_after = evaluate_preferences(model, held_rows, cfg, device, held_ref)
    lap("eval")
    # full fine-tuning: the whole model in transformers' format; LoRA: the PEFT adapter
    adapter_dir = None if full else ckpt.save_adapter(model, out / "adapter")
    model_dir = ckpt.save_model(model, out / "model") if full else None
    lap("save_adapter")
    ref_seconds = clock.get("ref_precompute", 0.0)
    result = {"rank": rank, "memory": memory, "peak_memory_bytes": peak_memory_bytes(device),
              "memory_after_load_bytes": load_bytes,
              "phase_seconds": clock, "reference_forwards": REFERENCE_FORWARDS - forwards_before,
              "checkpoint_blocked_seconds": save_blocked}
    if rank == 0:
        result.update(history=history, eval_before=eval_before, eval_after=eval_after,
                      adapter_dir=adapter_dir and str(adapter_dir), model_dir=model_dir and str(model_dir),
                      steps=steps, start_step=start,
                      world_size=ws, global_batch=global_batch, run_seconds=run_seconds,
                      ref_precompute_seconds=ref_seconds, ref_cache=ref_stats,
                      # the reference precompute is part of the run's cost, so it counts here
                      tokens_per_s=tokens_run / (run_seconds + ref_seconds) if run_seconds > 0 else 0.0,
                      output_dir=str(out))
        (out / "result.json").write_text(json.dumps(
            {k: v for k, v in result.items() if k != "history"}, indent=2, default=str))
    return result


def train_then_restart(cfg_dict: dict, restart_step: int, restart_dir: str) -> dict:
    """Rank function for the notebook: the run, then a restart from its step-`restart_step`
    checkpoint into `restart_dir` with a freshly built model, optimizer, scheduler and data
    iterator (everything a new process would rebuild), run to the end. One launch instead of
    two; tests/test_resume.py kills a run for real instead."""
    import shutil
    first = train_rank(cfg_dict)
    src = Path(cfg_dict["output_dir"]) / "checkpoints" / f"step_{restart_step:08d}"
    dst = Path(restart_dir) / "checkpoints" / src.name
    if dist.get_rank() == 0:
        if not src.exists():
            raise FileNotFoundError(f"no checkpoint {src}: set checkpoint.every to divide {restart_step} "
                                    f"and checkpoint.keep high enough to keep it")
        shutil.rmtree(restart_dir, ignore_errors=True)
        shutil.copytree(src, dst)
    dist.barrier()
    again = train_rank({**cfg_dict, "output_dir": str(restart_dir),
                        "checkpoint": {**cfg_dict["checkpoint"], "resume": True}})
    first["restart"] = {k: again.get(k) for k in ("history", "start_step", "eval_after", "reference_forwards",
                                                  "ref_cache")}
    return first


# --- entry points ------------------------------------------------------------------------------

def preflight(cfg: TrainConfig, nproc: int, backend: str | None = None) -> None:
    """The checks that must fail before any rank starts: ranks vs GPUs, wrappable layers,
    and every training row (an invalid one raises dpo_lab.data.InvalidRowError with its index)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dpo_lab.dpo.qlora import decoder_layers, resolve_model
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} needs {nproc} GPUs with nccl; {torch.cuda.device_count()} visible")
    path = resolve_model(cfg.model.name)
    with torch.device("meta"):  # structure only: no weights are read
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    decoder_layers(skeleton)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    load_data(cfg, tok)


def run(cfg: TrainConfig, nproc: int = 1, timeout: float = 1800, backend: str | None = None,
        restart_step: int | None = None, restart_dir=None, threads_per_rank: int | None = None) -> dict:
    """Launch `nproc` ranks on this machine and return rank 0's result (plus every rank's memory).
    With `restart_step`, the ranks then restart from that checkpoint (see train_then_restart)."""
    from dpo_lab.parallel import launch, pick_backend
    backend = backend or pick_backend(nproc)
    preflight(cfg, nproc, backend)
    if restart_step is None:
        fn, args = train_rank, (cfg.to_dict(),)
    else:
        fn, args = train_then_restart, (cfg.to_dict(), restart_step, str(restart_dir))
    results = launch(fn, nproc, args=args, backend=backend, timeout=timeout,
                     threads_per_rank=threads_per_rank)
    out = results[0]
    out["rank_memory"] = [r["memory"] for r in results]
    out["rank_peak_memory_bytes"] = [r["peak_memory_bytes"] for r in results]
    out["rank_memory_after_load_bytes"] = [r["memory_after_load_bytes"] for r in results]
    out["rank_reference_forwards"] = [r["reference_forwards"] for r in results]
    if restart_step is not None:
        out["restart"]["rank_reference_forwards"] = [r["restart"]["reference_forwards"] for r in results]
    return out


def _torchrun_main(cfg: TrainConfig) -> int:
    """Started by torchrun / accelerate launch: the environment names this rank."""
    from datetime import timedelta
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = os.environ.get("DPO_LAB_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs visible")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        res = train_rank(cfg.to_dict())
        if dist.get_rank() == 0:
            print(json.dumps(res.get("eval_after", {})))
    finally:
        dist.destroy_process_group()
    return 0


def cli_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dpo-lab train dpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (configs/dpo/*.yaml)")
    p.add_argument("--nproc", type=int, default=None, help="ranks to launch (default 1)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-4 dpo.beta=0.2")
    args = p.parse_args(argv)
    from dpo_lab.data import DataFileError, InvalidRowError
    from dpo_lab.dpo.qlora import WrapError
    try:
        cfg = load_config(args.config, args.overrides)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return _torchrun_main(cfg)
        res = run(cfg, args.nproc or 1, timeout=args.timeout)
    # Bad input found before any rank starts: one line, exit code 2, no traceback.
    except (ConfigError, InvalidRowError, DataFileError, WrapError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = res["history"][-1]
    print(json.dumps({"final": {k: round(v, 5) for k, v in last.items()},
                      "eval_before": res["eval_before"], "eval_after": res["eval_after"],
                      **({"adapter": res["adapter_dir"]} if res["adapter_dir"] else {"model": res["model_dir"]})},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
