"""Optimizer-state offload, built small: ZeRO-Offload (Ren et al. 2021) keeps Adam's state on the
host and runs the update there; ZeRO-Infinity (Rajbhandari et al. 2021) pushes the state further,
to NVMe, and hides the transfers behind the update by prefetching the next chunk.

`OffloadedAdamW` is torch.optim.AdamW (same formula, same order of floating-point operations) whose
two moments live in one of two tiers:

- "cpu": host memory (on a GPU machine: off the device; on a CPU-only one the tier is where the
  parameters already are, so only the bookkeeping differs);
- "disk": one file per chunk of parameters under a temporary directory; two staging buffers are
  resident. A single I/O thread reads chunk i+1 (and writes chunk i−1 back) while the main thread
  updates chunk i.

The update runs on the host; parameters on a GPU get a host copy (ZeRO-Offload's fp32 master).
"""
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

TIERS = ("cpu", "disk")
F32 = 4  # bytes per state value (the moments are fp32)


def chunk_params(numels: list[int], chunk_numel: int) -> list[list[int]]:
    """Indices of parameters grouped in order, each group at most chunk_numel values (a larger
    parameter is a chunk on its own): whole tensors per chunk, so each update is per tensor as in
    torch's AdamW."""
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel={chunk_numel} must be >= 1")
    chunks, cur, size = [], [], 0
    for i, n in enumerate(numels):
        if cur and size + n > chunk_numel:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def resident_state_bytes_formula(numels: list[int], chunk_numel: int, tier: str) -> int:
    """Host bytes of Adam state held in memory: both moments of every parameter in the "cpu" tier;
    two staging buffers of the largest chunk's two moments in the "disk" tier."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; have {TIERS}")
    if tier == "cpu":
        return 2 * F32 * sum(numels)
    largest = max(sum(numels[i] for i in c) for c in chunk_params(numels, chunk_numel))
    return 2 * 2 * F32 * largest


class OffloadedAdamW:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 tier="cpu", chunk_numel=1 << 20, directory=None):
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; have {TIERS}")
        self.params = [p for p in params if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("OffloadedAdamW keeps fp32 parameters; got "
                             f"{sorted({str(p.dtype) for p in self.params})}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.tier, self.step_count = tier, 0
        numels = [p.numel() for p in self.params]
        self.numels, self.chunks = numels, chunk_params(numels, chunk_numel)
        # Host copies of parameters that live on a device (the fp32 master weights); CPU ones are used in place.
        self.host = [p.detach() if p.device.type == "cpu" else p.detach().cpu().pin_memory()
                     for p in self.params]
        self.stats = dict(read_bytes=0, write_bytes=0, io_seconds=0.0, update_seconds=0.0)
        self.dir = None
        if tier == "cpu":
            self.state = [torch.zeros(2, n) for n in numels]  # exp_avg, exp_avg_sq
            return
        self.dir = tempfile.mkdtemp(prefix="offload-", dir=directory)
        self.paths = [os.path.join(self.dir, f"chunk{i}.bin") for i in range(len(self.chunks))]
        for path, c in zip(self.paths, self.chunks):
            with open(path, "wb") as f:
                f.truncate(2 * F32 * self._chunk_numel(c))  # zeros: Adam's moments start at 0
        largest = max(self._chunk_numel(c) for c in self.chunks)
        self.buffers = [torch.empty(2 * largest) for _ in range(2)]  # double buffering
        self.fds = [os.open(path, os.O_RDWR) for path in self.paths]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offload-io")
        self._io_lock = threading.Lock()

    def _chunk_numel(self, c):
        return sum(self.numels[i] for i in c)

    # --- memory accounting ---
    def resident_state_bytes(self) -> int:
        """Bytes of the state tensors this optimizer holds in memory (counted from the tensors)."""
        held = self.state if self.tier == "cpu" else self.buffers
        return sum(t.untyped_storage().nbytes() for t in held)

    # --- the update, as torch.optim.adam._single_tensor_adam with decoupled weight decay ---
    def _update(self, i, exp_avg, exp_avg_sq):
        p, grad = self.host[i], self.params[i].grad
        if grad is None:
            return
        grad = grad.detach().to("cpu", non_blocking=False)
        beta1, beta2 = self.betas
        step = self.step_count
        p.mul_(1 - self.lr * self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = self.lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _update_chunk(self, c, flat):
        n, off = self._chunk_numel(c), 0
        m, v = flat[:n], flat[n:2 * n]
        for i in c:
            k = self.numels[i]
            self._update(i, m[off:off + k].view_as(self.host[i]), v[off:off + k].view_as(self.host[i]))
            off += k

    # --- file I/O, on the I/O thread ---
    def _io(self, kind, j, buf):
        """Read or write chunk j's moments from/to buf: one positional system call on a file
        opened once (no Python buffering; the call releases the GIL)."""
        view = memoryview(buf[:2 * self._chunk_numel(self.chunks[j])].numpy()).cast("B")
        t0 = time.perf_counter()
        done = os.preadv(self.fds[j], [view], 0) if kind == "read" else os.pwritev(self.fds[j], [view], 0)
        if done != view.nbytes:
            raise IOError(f"{self.paths[j]}: {kind} {done} of {view.nbytes} bytes")
        with self._io_lock:
            self.stats["io_seconds"] += time.perf_counter() - t0
            self.stats[f"{kind}_bytes"] += view.nbytes

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        t0 = time.perf_counter()
        if self.tier == "cpu":
            for c in self.chunks:
                for i in c:
                    m, v = self.state[i]
                    self._update(i, m.view_as(self.host[i]), v.view_as(self.host[i]))
        else:
            pending = self.pool.submit(self._io, "read", 0, self.buffers[0])
            writes = []
            for j, c in enumerate(self.chunks):
                pending.result()
                buf = self.buffers[j % 2]
                if j + 1 < len(self.chunks):  # FIFO pool: runs after the write that last used this buffer
                    pending = self.pool.submit(self._io, "read", j + 1, self.buffers[(j + 1) % 2])
                self._update_chunk(c, buf)
                writes.append(self.pool.submit(self._io, "write", j, buf))
            for w in writes:
                w.result()
        for p, h in zip(self.params, self.host):
            if p.device.type != "cpu":
                p.data.copy_(h, non_blocking=True)
        self.stats["update_seconds"] += time.perf_counter() - t0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of parameter i, read back from its tier (for checks)."""
        if self.tier == "cpu":
            return tuple(t.view_as(self.params[i]).clone() for t in self.state[i])
        j = next(j for j, c in enumerate(self.chunks) if i in c)
        c = self.chunks[j]
        flat = torch.from_file(self.paths[j], size=2 * self._chunk_numel(c), dtype=torch.float32)
        off = sum(self.numels[k] for k in c[:c.index(i)])
        n, k = self._chunk_numel(c), self.numels[i]
        shape = self.params[i].shape
        return flat[off:off + k].view(shape).clone(), flat[n + off:n + off + k].view(shape).clone()

    def close(self):
        """Stop the I/O thread and delete the state files."""
        if self.dir is not None:
            self.pool.shutdown(wait=True)
            for fd in self.fds:
                os.close(fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def file_bandwidth(directory=None, nbytes: int = 64 << 20, files: int = 1, repeats: int = 3) -> dict:
    """Write and read bytes/s of `files` files of `nbytes` each in `directory`, with the
    optimizer's system calls (os.pwritev / os.preadv on files opened once, no fsync). The page
    cache may serve the reads, so on a machine with free memory this is the file system's speed,
    not the disk's. Best of `repeats`."""
    buf = memoryview(torch.rand(nbytes // F32).numpy()).cast("B")
    tmp = tempfile.mkdtemp(prefix="bw-", dir=directory)
    fds = [os.open(os.path.join(tmp, f"f{i}"), os.O_RDWR | os.O_CREAT) for i in range(files)]
    best_w = best_r = float("inf")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for fd in fds:
                os.pwritev(fd, [buf], 0)
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for fd in fds:
                os.preadv(fd, [buf], 0)
            best_r = min(best_r, time.perf_counter() - t0)
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(write=files * buf.nbytes / best_w, read=files * buf.nbytes / best_r)


def disk_step_model(chunk_bytes: list[int], read_bw: float, write_bw: float,
                    update_seconds: list[float]) -> float:
    """Seconds of the "disk" tier's optimizer step. One I/O thread reads and writes every chunk
    (busy Σ(b/read_bw + b/write_bw)); the main thread waits for the first read, updates every
    chunk, and the last write follows: with the two overlapped, the step takes the longer of
        Σ_j (b_j/read_bw + b_j/write_bw)      and      b_0/read_bw + Σ_j u_j + b_last/write_bw."""
    io = sum(b / read_bw + b / write_bw for b in chunk_bytes)
    chain = chunk_bytes[0] / read_bw + sum(update_seconds) + chunk_bytes[-1] / write_bw
    return max(io, chain)


def fsdp2_train(offload: bool, steps: int = 3, seed: int = 0, model_cfg=None, batch: int = 4, seq: int = 16) -> dict:
    """Rank function (dpo_lab.parallel.launch): TinyTransformer under torch's FSDP2 (`fully_shard`
    per block and at the root), with or without `CPUOffloadPolicy`, trained `steps` AdamW steps on
    the same batches on every rank. Returns the full parameters, where the sharded parameters and
    Adam's state live, and the best step time. With CPUOffloadPolicy, FSDP2 keeps the sharded
    parameters, gradients and optimizer state on the CPU and copies each layer's shard to the
    device for its all-gather; on a CPU-only run the compute device *is* the CPU, so the policy
    changes no placement and no bytes cross a bus."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from dpo_lab.arch.transformer import TinyTransformer
    from dpo_lab.parallel.launch import rank_device

    device = rank_device()
    torch.manual_seed(seed)  # the same initial weights on every rank: fully_shard does not broadcast
    model = TinyTransformer(**(model_cfg or dict(dim=64, n_layers=2, n_heads=4))).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda")) if offload else {}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, model.config["vocab_size"], (batch, seq), generator=g).to(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    first = next(iter(model.parameters()))
    return dict(params=[p.full_tensor().detach().cpu().clone() for p in model.parameters()],
                param_device=first.to_local().device.type,
                state_device=opt.state[first]["exp_avg"].to_local().device.type,
                compute_device=device.type, best_step_seconds=min(times))


def _sync():
    """Wait for queued GPU work, so that a timing covers it (a no-op on a CPU-only run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_training_steps(model, opt, tokens, steps: int = 4) -> dict:
    """Best seconds (over `steps`, the first a warm-up) of forward + backward and of opt.step()
    on the same batch: best, not mean, since neighbours on a shared machine only ever slow it."""
    compute, update = [], []
    for _ in range(steps + 1):
        opt.zero_grad()
        _sync()
        t0 = time.perf_counter()
        model(tokens).logsumexp(-1).mean().backward()
        _sync()
        t1 = time.perf_counter()
        opt.step()
        _sync()
        t2 = time.perf_counter()
        compute.append(t1 - t0)
        update.append(t2 - t1)
    return dict(compute=min(compute[1:]), update=min(update[1:]))
