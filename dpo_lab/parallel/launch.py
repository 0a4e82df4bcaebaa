"""Run a function on N ranks and get every rank's return value back.

    results = launch(fn, world_size=4, args=(x,))   # results[r] is what rank r returned

- Ranks are "spawn"ed processes, so `fn` must live in an importable module (not a notebook cell).
- The backend is nccl with one GPU per rank when there are enough GPUs, else gloo; pass
  `backend=` or set DPO_LAB_BACKEND to override.
- A free port is picked per launch, so launches never collide.
- If a rank raises, the others are stopped at once and RankFailed carries that rank's traceback.
  If the job outlives `timeout` seconds, every rank is killed and RankTimeout names the ranks
  that had not finished. No process is left behind either way.
"""
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    def __init__(self, rank: int, tb: str):
        self.rank, self.traceback = rank, tb
        super().__init__(f"rank {rank} failed:\n{tb}")


class RankTimeout(TimeoutError):
    def __init__(self, timeout: float, pending: list[int]):
        self.pending = pending
        super().__init__(f"timed out after {timeout:.0f}s; ranks still running: {pending}")


def pick_backend(world_size: int) -> str:
    override = os.environ.get("DPO_LAB_BACKEND")
    if override:
        return override
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_device() -> torch.device:
    """The device this rank computes on: its own GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, backend, threads, pg_timeout, args, kwargs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout),
                                **({"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}))
        out = fn(*args, **kwargs)
        # Plain pickle (not torch's shared-memory reducer): the bytes outlive this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _stop(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def launch(fn, world_size: int, args=(), kwargs=None, *, backend: str | None = None,
           timeout: float = 300, threads_per_rank: int | None = None) -> list:
    """Run fn(*args, **kwargs) on `world_size` ranks; return the list of per-rank results."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or pick_backend(world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl needs one GPU per rank: world_size={world_size} but "
                         f"{torch.cuda.device_count()} GPU(s) visible")
    if threads_per_rank is None:  # OMP_NUM_THREADS wins: oversubscribed OpenMP threads crawl
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads_per_rank = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # The process-group timeout is shorter than ours so a stuck collective raises inside the rank.
    pg_timeout = max(10, int(timeout * 0.9))
    procs = [ctx.Process(target=_worker, daemon=True, name=f"dpo-lab-rank{r}",
                         args=(fn, r, world_size, port, backend, threads_per_rank, pg_timeout,
                               tuple(args), dict(kwargs or {}), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RankTimeout(timeout, [r for r in range(world_size) if r not in done]) from None
                for r, p in enumerate(procs):  # died without reporting (segfault, OOM kill)
                    if r not in done and p.exitcode not in (None, 0):
                        try:  # its report may still be in the pipe
                            rank, status, payload = results.get(timeout=1.0)
                            break
                        except queue.Empty:
                            raise RankFailed(r, f"process exited with code {p.exitcode} "
                                                f"without reporting a result") from None
                else:
                    continue
            if status == "error":
                raise RankFailed(rank, payload)
            done[rank] = pickle.loads(payload)
    finally:
        if len(done) == world_size:
            for p in procs:
                p.join(10)
        _stop(procs)
        results.close()
    return [done[r] for r in range(world_size)]
