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
Each step records its timeline (`trace`: every read, update and write per chunk), the measured side of
`disk_step_model`, whose inputs `check_step_model` measures apart from the step.
"""
import glob
import os
import shutil
import statistics
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
        self.trace = []  # the last step's (kind, chunk, start s, end s) from step start: the timeline the model predicts
        self.dir = None
        if tier == "cpu":
            self.state = [torch.zeros(2, n) for n in numels]  # exp_avg, exp_avg_sq
            return
        self.dir = tempfile.mkdtemp(prefix="offload-", dir=directory)
        self.paths = [os.path.join(self.dir, f"chunk{i}.bin") for i in range(len(self.chunks))]
        largest = max(self._chunk_numel(c) for c in self.chunks)
        self.buffers = [torch.zeros(2 * largest) for _ in range(2)]  # double buffering
        self.fds = [os.open(path, os.O_RDWR | os.O_CREAT) for path in self.paths]
        for fd, c in zip(self.fds, self.chunks):
            # Adam's moments start at 0. Written with one large write, not created sparse (truncate):
            # on ext4 here every later copy of a sparse-created file ran at half the speed (about 6
            # against 13 GB/s), its page-cache pages made one small page at a time on first touch.
            view = memoryview(self.buffers[0][:2 * self._chunk_numel(c)].numpy()).cast("B")
            os.pwritev(fd, [view], 0)
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

    def _update_resident(self, c):
        for i in c:
            m, v = self.state[i]
            self._update(i, m.view_as(self.host[i]), v.view_as(self.host[i]))

    # --- file I/O, on the I/O thread ---
    def _io(self, kind, j, buf):
        """Read or write chunk j's moments from/to buf: one positional system call on a file
        opened once (no Python buffering; the call releases the GIL)."""
        view = memoryview(buf[:2 * self._chunk_numel(self.chunks[j])].numpy()).cast("B")
        t0 = time.perf_counter()
        done = os.preadv(self.fds[j], [view], 0) if kind == "read" else os.pwritev(self.fds[j], [view], 0)
        if done != view.nbytes:
            raise IOError(f"{self.paths[j]}: {kind} {done} of {view.nbytes} bytes")
        t1 = time.perf_counter()
        with self._io_lock:
            self.stats["io_seconds"] += t1 - t0
            self.stats[f"{kind}_bytes"] += view.nbytes
            self.trace.append((kind, j, t0 - self._t_step, t1 - self._t_step))

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        t0 = self._t_step = time.perf_counter()
        self.trace = []
        if self.tier == "cpu":
            for j, c in enumerate(self.chunks):
                u0 = time.perf_counter()
                self._update_resident(c)
                self.trace.append(("update", j, u0 - t0, time.perf_counter() - t0))
        else:
            pending = self.pool.submit(self._io, "read", 0, self.buffers[0])
            writes = []
            for j, c in enumerate(self.chunks):
                pending.result()
                buf = self.buffers[j % 2]
                if j + 1 < len(self.chunks):  # FIFO pool: runs after the write that last used this buffer
                    pending = self.pool.submit(self._io, "read", j + 1, self.buffers[(j + 1) % 2])
                u0 = time.perf_counter()
                self._update_chunk(c, buf)
                self.trace.append(("update", j, u0 - t0, time.perf_counter() - t0))
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


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of CPU 0's largest cache (Linux sysfs), or `default` where it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(index).read().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=default)


def file_bandwidth(directory=None, chunk_bytes=(64 << 20,), repeats: int = 3, evict_bytes: int | None = None,
                   fds=None) -> dict:
    """Read and write bytes/s of the disk tier's I/O pattern, timed apart from any update: one file per
    chunk of `chunk_bytes`, two staging buffers in turn, each chunk read then written back unchanged
    with os.preadv / os.pwritev (no fsync) on a second thread, as the optimizer's I/O thread does.
    `fds`: the optimizer's own open files (its state is written back as it was read), so that the
    bandwidth is that of the very files and page-cache pages the step copies; default: new files in
    `directory`, written once with one large write as the optimizer writes its own.
    Between two calls a pass over `evict_bytes` (more than the last-level cache; twice its size by
    default) stands for the update's traffic: the step's copies find neither the buffer nor the
    page-cache pages in the cache (a warm loop over a few MiB runs about twice as fast on a 32 MiB-L3
    CPU). The page cache serves the reads, so on a machine with free memory this is the memory copy's
    speed, not the disk's. Best of `repeats` passes over all chunks."""
    if not chunk_bytes or min(chunk_bytes) < F32:
        raise ValueError(f"chunk_bytes={chunk_bytes!r}: need chunks of at least {F32} bytes")
    if fds is not None and len(fds) != len(chunk_bytes):
        raise ValueError(f"{len(fds)} files for {len(chunk_bytes)} chunks")
    bufs = [torch.rand(max(chunk_bytes) // F32) for _ in range(2)]
    views = [memoryview(b.numpy()).cast("B") for b in bufs]
    evict = torch.zeros(evict_bytes or 2 * last_level_cache_bytes(), dtype=torch.uint8)
    tmp = None
    if fds is None:
        tmp = tempfile.mkdtemp(prefix="bw-", dir=directory)
        fds = [os.open(os.path.join(tmp, f"chunk{j}.bin"), os.O_RDWR | os.O_CREAT) for j in range(len(chunk_bytes))]

    def timed(call, fd, view):
        t0 = time.perf_counter()
        call(fd, [view], 0)
        return time.perf_counter() - t0

    best_r = best_w = float("inf")
    try:
        with ThreadPoolExecutor(1) as io:  # the copies run on another thread than the one that touched the buffer
            if tmp is not None:
                for fd, b in zip(fds, chunk_bytes):
                    os.pwritev(fd, [views[0][:b - b % F32]], 0)  # the files exist before the step, as the optimizer's do
            for _ in range(repeats):
                t_r = t_w = 0.0
                for j, (fd, b) in enumerate(zip(fds, chunk_bytes)):
                    view = views[j % 2][:b - b % F32]
                    evict.fill_(j)
                    t_r += io.submit(timed, os.preadv, fd, view).result()
                    evict.fill_(j + 1)  # as the update streams its tensors between the read and the write
                    t_w += io.submit(timed, os.pwritev, fd, view).result()
                best_r, best_w = min(best_r, t_r), min(best_w, t_w)
    finally:
        if tmp is not None:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(b - b % F32 for b in chunk_bytes)
    return dict(write=total / best_w, read=total / best_r)


def overlap_cores(a, b, pool: ThreadPoolExecutor) -> float:
    """How many cores two pieces of work get when they run together: `a` on this thread, `b` on `pool`'s
    thread: (seconds of a alone + seconds of b alone) / seconds of both at once, between 1 (they take
    turns: one core, or a lock, or memory bandwidth they share) and 2 (perfect overlap)."""
    t0 = time.perf_counter()
    a()
    t_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool.submit(b).result()
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    other = pool.submit(b)
    a()
    other.result()
    return min(2.0, max(1.0, (t_a + t_b) / (time.perf_counter() - t0)))


def disk_step_model(chunk_bytes: list[int], read_bw: float, write_bw: float,
                    update_seconds: list[float], cores: float = 2.0) -> float:
    """Seconds of the "disk" tier's optimizer step. One I/O thread reads and writes every chunk
    (busy Σ_j (b_j/read_bw + b_j/write_bw)); the main thread waits for the first read, updates every
    chunk, and the last write follows. The copies are CPU work (the kernel copies page-cache pages in the
    I/O thread), so the two threads overlap only as far as `cores` (measured by `overlap_cores`) allow:
        max( Σ_j (b_j/β_r + b_j/β_w),   b_0/β_r + Σ_j u_j + b_last/β_w,   (Σ_j (b_j/β_r + b_j/β_w) + Σ_j u_j) / cores ).
    With 2 free cores the last term never wins (ideal overlap); with 1 the step is the plain sum."""
    if not 1 <= cores:
        raise ValueError(f"cores={cores} must be >= 1")
    io = sum(b / read_bw + b / write_bw for b in chunk_bytes)
    chain = chunk_bytes[0] / read_bw + sum(update_seconds) + chunk_bytes[-1] / write_bw
    return max(io, chain, (io + sum(update_seconds)) / cores)


def check_step_model(make_model, tokens, chunk_numel: int, directory=None, rounds: int = 10) -> dict:
    """The disk tier's step against `disk_step_model`, every input measured apart from the disk step:
    per-chunk update seconds from the "cpu" tier's step (its trace), the bandwidths of the step's I/O
    pattern (`file_bandwidth`) and the cores the update and the copies get when run together
    (`overlap_cores`: the host tier's step on this thread, the step's reads and writes on another). The measurements take turns, `rounds`
    times, so that all of them see the same neighbours; the steps and bandwidths are the best of their
    rounds (the least disturbed), the free cores the median. Returns the inputs, the prediction with and without the
    cores term, the measured step and both tiers' traces."""
    opts, best, traces = {}, {}, {}
    try:
        for tier in TIERS:
            model = make_model()
            model(tokens).logsumexp(-1).mean().backward()
            opts[tier] = OffloadedAdamW(model.parameters(), tier=tier, chunk_numel=chunk_numel, directory=directory)
            opts[tier].step()  # warm-up: first touch of the buffers and the files' pages
        disk = opts["disk"]
        chunk_bytes = [2 * F32 * disk._chunk_numel(c) for c in disk.chunks]
        bw, cores = dict(read=0.0, write=0.0), []
        staging = [memoryview(torch.empty(max(chunk_bytes) // F32).numpy()).cast("B") for _ in range(2)]

        def copies():  # the step's reads and writes, alone: each chunk read, then written back unchanged
            for j, b in enumerate(chunk_bytes):
                os.preadv(disk.fds[j], [staging[j % 2][:b]], 0)
                os.pwritev(disk.fds[j], [staging[j % 2][:b]], 0)

        with ThreadPoolExecutor(1) as io:
            for _ in range(rounds):
                for tier, opt in opts.items():
                    t0 = time.perf_counter()
                    opt.step()
                    t = time.perf_counter() - t0
                    if t < best.get(tier, float("inf")):
                        best[tier], traces[tier] = t, list(opt.trace)
                b = file_bandwidth(directory, chunk_bytes, repeats=1, fds=disk.fds)  # the step's own files
                bw = {k: max(bw[k], b[k]) for k in bw}
                cores.append(overlap_cores(opts["cpu"].step, copies, io))  # the update against the copies
    finally:
        for opt in opts.values():
            opt.close()
    # the typical round's cores, not the best: a second core free for one probe says little about a whole step
    cores = statistics.median(cores)
    upd = trace_seconds(traces["cpu"], "update")
    predicted = disk_step_model(chunk_bytes, bw["read"], bw["write"], upd, cores=cores)
    return dict(chunk_bytes=chunk_bytes, read_bw=bw["read"], write_bw=bw["write"], cores=cores, update_seconds=upd,
                predicted=predicted, predicted_ideal_overlap=disk_step_model(chunk_bytes, bw["read"], bw["write"], upd),
                measured=best["disk"], cpu_step=best["cpu"], traces=traces,
                rel_err=predicted / best["disk"] - 1)


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
    on the same batch: best, not mean, since neighbours on a shared machine only ever slow it. For an
    OffloadedAdamW, also the per-chunk timeline (`trace`) of its best step."""
    compute, update, trace = [], [], None
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
        if len(update) > 1 and update[-1] == min(update[1:]):
            trace = list(getattr(opt, "trace", []))
    return dict(compute=min(compute[1:]), update=min(update[1:]), trace=trace)


def trace_seconds(trace, kind: str) -> list[float]:
    """Per-chunk seconds of one kind ("read", "update", "write") in a step's trace, in chunk order."""
    return [end - start for _, _, start, end in sorted((e for e in trace if e[0] == kind), key=lambda e: e[1])]
