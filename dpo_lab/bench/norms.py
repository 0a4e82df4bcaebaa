"""LayerNorm and RMSNorm: our from-scratch modules vs PyTorch's, forward+backward at LLM shapes.

`dpo-lab bench norms [--quick]`. The from-scratch versions are a chain of elementwise ops and
reductions, each a separate pass over memory (and, in training, a saved activation); PyTorch's
are single fused kernels. Both are memory-bound, so the ratio is roughly the ratio of passes.
"""
import torch
import torch.nn as nn

from dpo_lab.arch.norms import LayerNorm, RMSNorm
from dpo_lab.bench import Table, median_time
from dpo_lab.runtime import default_device

# (tokens = batch·seq, hidden size): a 1B-ish and a 7B-ish layer at a few thousand tokens.
SHAPES = [(2048, 2048), (4096, 4096), (8192, 4096)]
QUICK_SHAPES = [(1024, 2048), (2048, 4096)]


def _pairs(dim):
    return {"layernorm": (LayerNorm(dim), nn.LayerNorm(dim)),
            "rmsnorm": (RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6))}


def run(quick: bool = False) -> Table:
    device = default_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    repeat = 5 if quick else 20
    rows = []
    for tokens, dim in (QUICK_SHAPES if quick else SHAPES):
        x = torch.randn(tokens, dim, device=device, requires_grad=True)
        grad = torch.randn(tokens, dim, device=device)
        for norm, (ours, theirs) in _pairs(dim).items():
            for variant, module in (("torch", theirs), ("scratch", ours)):
                module = module.to(device)

                def step():
                    x.grad = None
                    module(x).backward(grad)
                seconds = median_time(step, warmup=2, repeat=repeat, sync=sync)
                # bytes the ideal fused kernel must move: read x, write y; read x, dy, write dx
                gb_min = 5 * x.numel() * x.element_size() / 1e9
                rows.append({"variant": variant, "norm": norm, "shape": f"{tokens}x{dim}",
                             "ms": seconds * 1e3, "GB_per_s_min": gb_min / seconds})
    return Table("LayerNorm / RMSNorm forward+backward (fp32)", rows, metric="ms", baseline="torch",
                 group_by=("norm", "shape"),
                 notes={"device": str(device), "GB_per_s_min": "5 tensor passes / time: a lower bound on traffic"})
