"""Run a function on N ranks and get every rank's return value back.

    results = launch(fn, world_size=4, args=(x,))   # results[r] is what rank r returned

- Ranks are fresh processes forked from a "forkserver" that has already imported torch (each rank
  starts about 1.5 s sooner than a "spawn"ed one; spawn where there is no forkserver, as on
  Windows). Each rank gets the caller's environment as it is at the call.
- `fn`, `args` and `kwargs` travel with cloudpickle: a function defined in a notebook cell (or a
  lambda, or a closure) is sent by value and runs on the ranks as it is; functions of importable
  modules are sent by reference and imported there, as plain pickle would.
- The backend is nccl with one GPU per rank when there are enough GPUs, else gloo; pass
  `backend=` or set DPO_LAB_BACKEND to override.
- Rank 0 opens the rendezvous store on a port the OS picks and hands it to the others, so
  launches never collide (picking a free port first and binding it later is a race).
- If a rank raises, the others are stopped at once and RankFailed carries that rank's traceback.
  If a rank dies without reporting (os._exit, a signal, the OOM killer), RankFailed names it and its
  exit code or signal, even when its peers then fail with "connection reset by peer".
  If the job outlives `timeout` seconds, every rank is killed and RankTimeout names the ranks
  that had not finished. No process is left behind either way.
"""
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
import warnings
from datetime import timedelta

import cloudpickle
import torch
import torch.distributed as dist

DEATH_GRACE_S = 3.0  # how long a survivor's error waits for a silently dead rank to be noticed


class RankFailed(RuntimeError):
    """A rank raised (`traceback` is its traceback) or died without reporting (`exitcode` says how)."""

    def __init__(self, rank: int, tb: str, exitcode: int | None = None):
        self.rank, self.traceback, self.exitcode = rank, tb, exitcode
        super().__init__(f"rank {rank} failed:\n{tb}")


class RankTimeout(TimeoutError):
    def __init__(self, timeout: float, pending: list[int]):
        self.timeout, self.pending = timeout, pending
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


def _rendezvous(rank, world_size, port, pg_timeout) -> dist.TCPStore:
    """Rank 0 binds port 0 (the OS picks a free one) and publishes it in the shared `port` value;
    the others wait for it and connect."""
    wait = timedelta(seconds=pg_timeout)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=wait,
                              wait_for_workers=False)  # publish the port first
        with port.get_lock():
            port.value = store.port
    else:
        deadline = time.monotonic() + pg_timeout
        while port.value == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 opened no rendezvous store in {pg_timeout}s")
            time.sleep(0.01)
        store = dist.TCPStore("127.0.0.1", port.value, world_size, is_master=False, timeout=wait)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    return store


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["dpo_lab.parallel.launch"])  # torch, imported once
        return ctx
    return mp.get_context("spawn")


def _worker(payload, rank, world_size, port, backend, threads, pg_timeout, env, results):
    # A forkserver child inherits the server's environment, not the caller's: restore the caller's.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = _rendezvous(rank, world_size, port, pg_timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout),
                                **({"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}))
        # gloo's connectFullMesh can return on one rank while a peer is still finishing its
        # handshake; a rank whose fn needs no collective would then exit and close the socket
        # under that peer ("Connection closed by peer"). A barrier holds every rank until all
        # are connected.
        dist.barrier()
        fn, args, kwargs = pickle.loads(payload)
        out = fn(*args, **kwargs)
        # Plain pickle (not torch's shared-memory reducer): the bytes outlive this process.
        results.put((rank, "ok", pickle.dumps(out)))
        # No barrier here: it would pair with a collective that fn left unmatched on another rank
        # and hide the mismatch (tests/test_exercises.py::test_verdicts_from_ranks).
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def describe_exit(code: int) -> str:
    """'exit code 3' or 'killed by signal SIGKILL' (multiprocessing reports a signal as -signum)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _stop(procs, grace: float):
    """Let every rank exit by itself for `grace` seconds, then SIGTERM, then SIGKILL: a finished
    rank is never killed halfway through tearing down its process group."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


class _Reports:
    """The ranks' reports as they arrive, and which ranks died without one."""

    def __init__(self, procs, results):
        self.procs, self.results = procs, results
        self.ok: dict[int, object] = {}
        self.errors: dict[int, str] = {}

    def poll(self, wait: float) -> bool:
        """Take one report (waiting up to `wait` s); False if none came."""
        try:
            rank, status, payload = self.results.get(timeout=wait)
        except queue.Empty:
            return False
        if status == "ok":
            self.ok[rank] = pickle.loads(payload)
        else:
            self.errors[rank] = payload
        return True

    def silent_dead(self) -> list[int]:
        """Ranks whose process ended without a report, after reading what is left in the pipe
        (a rank that reported and exited may not have been read yet)."""
        dead = lambda: [r for r, p in enumerate(self.procs)
                        if p.exitcode is not None and r not in self.ok and r not in self.errors]
        if dead():
            while self.poll(0.5):
                pass
        return dead()

    def died(self, rank: int) -> RankFailed:
        code = self.procs[rank].exitcode
        msg = f"process died without reporting a result: {describe_exit(code)}"
        if self.errors:  # the survivors' errors ("connection reset by peer") follow from the death
            msg += "\nother ranks then failed (likely a consequence):" + "".join(
                f"\n  rank {r}: {tb.strip().splitlines()[-1]}" for r, tb in sorted(self.errors.items()))
        return RankFailed(rank, msg, exitcode=code)


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
    ctx = _context()
    results = ctx.Queue()
    port = ctx.Value("i", 0)  # rank 0 writes the store's port here
    # The process-group timeout is shorter than ours so a stuck collective raises inside the rank.
    pg_timeout = max(10, int(timeout * 0.9))
    # cloudpickle sends what the ranks could not import (a notebook cell's function) by value.
    payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
    procs = [ctx.Process(target=_worker, daemon=True, name=f"dpo-lab-rank{r}",
                         args=(payload, r, world_size, port, backend, threads_per_rank, pg_timeout,
                               dict(os.environ), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    rep = _Reports(procs, results)
    deadline = time.monotonic() + timeout
    try:
        while len(rep.ok) < world_size:
            if dead := rep.silent_dead():
                raise rep.died(dead[0])
            if rep.errors:
                # A rank that dies makes its peers fail ("connection reset by peer") a moment
                # later; name the dead rank, not a survivor, if one shows up within a few seconds.
                grace = time.monotonic() + DEATH_GRACE_S
                while time.monotonic() < grace and not rep.silent_dead():
                    rep.poll(0.1)
                if dead := rep.silent_dead():
                    raise rep.died(dead[0])
                rank = next(iter(rep.errors))  # the first to report: later ones may be echoes
                raise RankFailed(rank, rep.errors[rank])
            if time.monotonic() > deadline:
                raise RankTimeout(timeout, [r for r in range(world_size) if r not in rep.ok])
            rep.poll(0.2)
    finally:
        # Ranks that finished are tearing down their process groups: give them time to exit.
        _stop(procs, grace=60 if len(rep.ok) == world_size else 2)
        results.close()
    for r, p in enumerate(procs):
        if p.exitcode != 0:
            warnings.warn(f"rank {r} returned its result but then exited with {describe_exit(p.exitcode)}",
                          RuntimeWarning, stacklevel=2)
    return [rep.ok[r] for r in range(world_size)]
