"""Token log-probs at a large vocabulary: naive log_softmax + gather vs the chunked head.

`dpo-lab bench logprobs [--quick]`; `measure(...)` gives one shape's numbers as a dict. Both
variants run forward + backward of Σ log p(label) from the final hidden states (the LM head and
the softmax, not the model body). Peak bytes are those allocated above the inputs during that
step: `torch.cuda.max_memory_allocated` on a GPU, the running sum of the allocator's events
recorded by `torch.profiler(profile_memory=True)` on a CPU.
"""
import torch
import torch.nn.functional as F

from dpo_lab.bench import Table, median_time
from dpo_lab.dpo.logprobs import CHUNK_SIZE, token_logps
from dpo_lab.runtime import default_device

# (tokens N, hidden H, vocabulary V): Qwen2-0.5B's head (896, 151 936) at a 2k-token micro-batch
SHAPE = (2048, 896, 151_936)
QUICK_SHAPE = (2048, 128, 151_936)


def naive_logps(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation (+) and free (−) the profiler saw, in time order; the running sum's
    # maximum is the peak (FunctionEvent's self memory would lump a Python block's frees together)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(n_tokens: int, hidden: int, vocab: int, chunk_size: int = CHUNK_SIZE,
            dtype=torch.float32, device=None, repeat: int = 3) -> dict:
    """{naive_s, chunked_s, naive_peak_bytes, chunked_peak_bytes} for forward + backward of one
    [n_tokens, hidden] x [vocab, hidden] head, weight trainable (the full fine-tuning case)."""
    device = torch.device(device) if device is not None else default_device()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(vocab, (n_tokens,), generator=g).to(device)
    steps = {"naive": lambda: naive_logps(h, w, y),
             "chunked": lambda: token_logps(h, w, y, chunk_size=chunk_size)}
    out = {}
    for name, logps in steps.items():
        def step():
            h.grad = w.grad = None
            logps().sum().backward()
        if device.type == "cuda":
            sync = lambda: torch.cuda.synchronize(device)
            out[f"{name}_s"] = median_time(step, warmup=1, repeat=repeat, sync=sync)
            h.grad = w.grad = None
            out[f"{name}_peak_bytes"] = _cuda_peak_bytes(step, device)
        else:
            out[f"{name}_s"] = median_time(step, warmup=1, repeat=repeat)
            h.grad = w.grad = None
            out[f"{name}_peak_bytes"] = _cpu_peak_bytes(step)
    return out


def run(quick: bool = False) -> Table:
    n, hid, vocab = QUICK_SHAPE if quick else SHAPE
    m = measure(n, hid, vocab, repeat=2 if quick else 3)
    rows = [{"variant": v, "shape": f"N={n} H={hid} V={vocab}", "s": m[f"{v}_s"],
             "peak_MB": m[f"{v}_peak_bytes"] / 2 ** 20} for v in ("naive", "chunked")]
    return Table("token log-probs, forward+backward of the LM head (fp32)", rows, metric="s",
                 baseline="naive", group_by=("shape",),
                 notes={"chunk_size": CHUNK_SIZE,
                        "peak_MB": "allocated above the inputs; [N, V] fp32 = "
                                   f"{n * vocab * 4 / 2 ** 20:.0f} MB"})
