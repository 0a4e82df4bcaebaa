"""Synchronous vs asynchronous checkpoints with torch.distributed.checkpoint (DCP).

`dcp.save` blocks training until every shard is on disk. `dcp.async_save` first copies the state
into CPU memory (the snapshot, "staging"), returns, and writes the snapshot from a background
thread while training goes on: training is blocked only for the copy, at the price of one more
copy of the state in host memory until the write ends (PyTorch's "Asynchronous Saving with
Distributed Checkpoint", pytorch.org/tutorials/recipes/distributed_async_checkpoint_recipe).

    blocked_times(nproc=2)        seconds training is blocked per checkpoint, sync vs async, and
                                  the snapshot's bytes per rank (FSDP2-sharded MLP + Adam state)
    resume_vs_uninterrupted(cfg)  the DPO trainer with checkpoint.async_save=true, killed while an
                                  asynchronous save is being written, resumed: its history against
                                  an uninterrupted run's
"""
import statistics
import tempfile
import time
from pathlib import Path

import torch

KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "learning_rate")


def _state_bytes(sd) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: DTensors count their local shard,
    which is what DCP's stager copies."""
    if isinstance(sd, dict):
        return sum(_state_bytes(v) for v in sd.values())
    if isinstance(sd, (list, tuple)):
        return sum(_state_bytes(v) for v in sd)
    if torch.is_tensor(sd):
        local = sd.to_local() if hasattr(sd, "to_local") else sd
        return local.numel() * local.element_size()
    return 0


def _sharded_mlp(width: int, layers: int, seed: int):
    """An FSDP2-sharded MLP and an AdamW that has stepped once (so its m and v exist)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    return model, opt


def _blocked_rank(width: int, layers: int, repeats: int, root: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model, opt = _sharded_mlp(width, layers, seed=0)
    group = dist.new_group(backend="gloo")  # the writer thread's own group, as the trainer does
    sync, blocked, total = [], [], []
    for i in range(repeats + 1):  # the first of each is a warm-up (DCP's first plan is slower)
        msd, osd = get_state_dict(model, opt)
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/sync_{i}")
        t_sync = time.perf_counter() - t0
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/async_{i}",
                             process_group=group)
        t_blocked = time.perf_counter() - t0
        fut.result()
        t_total = time.perf_counter() - t0
        if i:
            sync.append(t_sync)
            blocked.append(t_blocked)
            total.append(t_total)
    return {"sync_s": statistics.median(sync), "async_blocked_s": statistics.median(blocked),
            "async_total_s": statistics.median(total), "snapshot_bytes": _state_bytes((msd, osd))}


def blocked_times(nproc: int = 2, width: int = 1024, layers: int = 8, repeats: int = 3) -> dict:
    """Per checkpoint, on `nproc` ranks: median seconds a synchronous save blocks (`sync_s`), an
    asynchronous one blocks (`async_blocked_s`: the snapshot copy) and takes to be on disk
    (`async_total_s`), and the snapshot's extra host memory per rank (`snapshot_bytes`, counted
    from the staged tensors: the parameter shards and Adam's m and v). The slowest rank counts."""
    from dpo_lab.parallel import launch
    if nproc < 1 or width < 1 or layers < 1 or repeats < 1:
        raise ValueError(f"nproc, width, layers and repeats must be >= 1, got {nproc}, {width}, "
                         f"{layers}, {repeats}")
    with tempfile.TemporaryDirectory(prefix="async_ckpt_") as root:
        ranks = launch(_blocked_rank, nproc, args=(width, layers, repeats, root), timeout=600)
    out = {k: max(r[k] for r in ranks) for k in ("sync_s", "async_blocked_s", "async_total_s",
                                                 "snapshot_bytes")}
    out["blocked_ratio_vs_sync"] = out["async_blocked_s"] / out["sync_s"]
    out["nproc"] = nproc
    return out


def max_abs_diff(a: list[dict], b: list[dict], keys=KEYS) -> float:
    """Largest difference of the logged metrics between two histories of the same steps."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise ValueError(f"histories cover different steps: {[r['step'] for r in a]} vs "
                         f"{[r['step'] for r in b]}")
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys)


def resume_vs_uninterrupted(cfg, nproc: int = 2, crash_at: int = 4, out_dir=None,
                            timeout: float = 900) -> dict:
    """Run `cfg` without interruption (synchronous checkpoints); run it again with asynchronous
    checkpoints, killing every rank right after the save of step `crash_at` was handed to the
    writer thread; resume. Returns both histories, the checkpoint the crash left as the latest
    and the largest metric difference. `cfg.checkpoint.every` must divide `crash_at`; the runs
    go under `out_dir` (default: a new temporary directory, left for inspection)."""
    import dataclasses

    from dpo_lab.dpo import checkpoint as ckpt
    from dpo_lab.dpo.trainer import run
    from dpo_lab.parallel import RankFailed
    if not cfg.checkpoint.every or crash_at % cfg.checkpoint.every:
        raise ValueError(f"crash_at={crash_at} is not a checkpoint step of checkpoint.every="
                         f"{cfg.checkpoint.every}")
    out = Path(out_dir or tempfile.mkdtemp(prefix="async_resume_"))

    def variant(name, async_save, resume, crash=None):
        return dataclasses.replace(
            cfg, output_dir=str(out / name),
            checkpoint=dataclasses.replace(cfg.checkpoint, async_save=async_save, resume=resume),
            debug=dataclasses.replace(cfg.debug, crash_while_saving=crash))

    whole = run(variant("whole", False, False), nproc=nproc, timeout=timeout)
    try:
        run(variant("cut", True, False, crash=crash_at), nproc=nproc, timeout=timeout)
        raise RuntimeError(f"the run with debug.crash_while_saving={crash_at} did not crash")
    except RankFailed:
        pass
    left = ckpt.latest(out / "cut" / "checkpoints")
    partial = sorted(p.name for p in (out / "cut" / "checkpoints").glob("*.partial"))
    resumed = run(variant("cut", True, True), nproc=nproc, timeout=timeout)
    return {"whole": whole["history"], "resumed": resumed["history"],
            "start_step": resumed["start_step"], "latest_after_crash": left.name if left else None,
            "partial_after_crash": partial, "blocked_s": resumed["checkpoint_blocked_seconds"],
            "max_abs_diff": max_abs_diff(whole["history"], resumed["history"]),
            "eval_after": (whole["eval_after"], resumed["eval_after"])}


def figures(blocked: dict, resume: dict) -> dict:
    """The notebook's figures from blocked_times() and resume_vs_uninterrupted()."""
    return {"async_ckpt_blocked_s_ratio_vs_sync": blocked["blocked_ratio_vs_sync"],
            "async_ckpt_sync_s": blocked["sync_s"], "async_ckpt_async_blocked_s": blocked["async_blocked_s"],
            "async_ckpt_async_total_s": blocked["async_total_s"],
            "async_ckpt_snapshot_mib": blocked["snapshot_bytes"] / 2**20,
            "async_resume_vs_uninterrupted_max_abs_diff": resume["max_abs_diff"]}
