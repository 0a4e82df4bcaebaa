"""Normalisation layers from scratch: BatchNorm, LayerNorm, RMSNorm and WeightNorm.

Each differs in *what* it normalises over:
  BatchNorm   each feature over the batch (and length) axis; running statistics at eval
  LayerNorm   each token over its features: subtract the mean, divide by the std
  RMSNorm     each token over its features: divide by the root mean square (no centring, no bias)
  WeightNorm  not the activations but a weight: w = g · v / ‖v‖
Backward comes from autograd; `compare_with_torch` checks forward and every gradient against
the PyTorch twin.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNorm1d(nn.Module):
    """Input (N, C) or (N, C, L); statistics per channel C over N (and L)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"BatchNorm1d expects (N, C) or (N, C, L), got shape {tuple(x.shape)}")
        dims = (0,) if x.dim() == 2 else (0, 2)
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
        if self.training:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)  # normalise with the biased variance...
            n = x.numel() // x.shape[1]
            with torch.no_grad():  # ...but track the unbiased one, as PyTorch does
                unbiased = var * n / max(n - 1, 1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Statistics in fp32 even for bf16 inputs: a mean of squares overflows/underflows easily.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class WeightNormLinear(nn.Module):
    """A linear layer whose weight is w = g · v / ‖v‖ (one norm per output row, Salimans & Kingma)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        v = nn.Linear(in_features, out_features).weight.detach().clone()
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(v.norm(dim=1, keepdim=True))  # starts at w = v
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self):
        return self.g * self.v / self.v.norm(dim=1, keepdim=True)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------- torch twins

def torch_twin(kind: str, dim: int, eps: float | None = None):
    """(ours, torch's) with identical parameters; `kind` in batchnorm|layernorm|rmsnorm|weightnorm."""
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g)
    if kind == "batchnorm":
        ours, ref = BatchNorm1d(dim), nn.BatchNorm1d(dim)
        params = {"weight": 1 + 0.1 * rand(dim), "bias": 0.1 * rand(dim)}
    elif kind == "layernorm":
        ours, ref = LayerNorm(dim), nn.LayerNorm(dim)
        params = {"weight": 1 + 0.1 * rand(dim), "bias": 0.1 * rand(dim)}
    elif kind == "rmsnorm":
        eps = 1e-6 if eps is None else eps
        ours, ref = RMSNorm(dim, eps), nn.RMSNorm(dim, eps=eps)
        params = {"weight": 1 + 0.1 * rand(dim)}
    elif kind == "weightnorm":
        ours = WeightNormLinear(dim, dim)
        ref = nn.utils.parametrizations.weight_norm(nn.Linear(dim, dim), dim=0)
        v = rand(dim, dim) / dim ** 0.5
        params = {"v": v, "g": 1 + 0.1 * rand(dim, 1), "bias": 0.1 * rand(dim)}
        with torch.no_grad():
            ref.parametrizations.weight.original0.copy_(params["g"])
            ref.parametrizations.weight.original1.copy_(v)
            ref.bias.copy_(params["bias"])
    else:
        raise ValueError(f"unknown norm kind {kind!r}; have batchnorm, layernorm, rmsnorm, weightnorm")
    with torch.no_grad():
        for name, value in params.items():
            getattr(ours, name).copy_(value)
            if kind != "weightnorm":
                getattr(ref, name).copy_(value)
    return ours, ref


def _params_of(module, kind):
    if kind == "weightnorm" and hasattr(module, "parametrizations"):
        p = module.parametrizations.weight
        return {"g": p.original0, "v": p.original1, "bias": module.bias}
    return dict(module.named_parameters())


def compare_with_torch(kind: str, dim: int = 32, batch: int = 4, seq: int = 8, seed: int = 0) -> dict:
    """Max |ours − torch| over the output, the input gradient and every parameter gradient.

    BatchNorm is run twice in training mode (running stats must agree) and then in eval mode.
    """
    ours, ref = torch_twin(kind, dim)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, dim, seq) if kind == "batchnorm" else (batch, seq, dim)
    diffs = {"forward": 0.0, "backward": 0.0}
    modes = ["train", "train", "eval"] if kind == "batchnorm" else ["train"]
    for mode in modes:
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(*shape, generator=g) + 0.5
        grad_out = torch.randn(*shape, generator=g)
        outs, grads = [], []
        for m in (ours, ref):
            xi = x.clone().requires_grad_(True)
            m.zero_grad()
            y = m(xi)
            y.backward(grad_out)
            ps = _params_of(m, kind)
            outs.append(y.detach())
            grads.append([xi.grad] + [ps[k].grad for k in sorted(ps)])
        diffs["forward"] = max(diffs["forward"], (outs[0] - outs[1]).abs().max().item())
        for a, b in zip(*grads):
            diffs["backward"] = max(diffs["backward"], (a - b).abs().max().item())
    if kind == "batchnorm":
        diffs["running_stats"] = max((ours.running_mean - ref.running_mean).abs().max().item(),
                                     (ours.running_var - ref.running_var).abs().max().item())
    diffs["max"] = max(diffs.values())
    return diffs


# --------------------------------------------------------------------------- what each normalises over

@torch.no_grad()
def batch_dependence(norm: nn.Module, batch_size: int, dim: int = 32, trials: int = 50,
                     seed: int = 0) -> float:
    """How much one fixed example's normalised output moves when its batch-mates change.

    Returns the mean (over features) std (over trials) of that example's output in training
    mode. BatchNorm depends on the batch; LayerNorm/RMSNorm give exactly 0.
    """
    g = torch.Generator().manual_seed(seed)
    norm.train()
    x0 = torch.randn(1, dim, generator=g)
    outs = []
    for _ in range(trials):
        mates = torch.randn(batch_size - 1, dim, generator=g)
        outs.append(norm(torch.cat([x0, mates]))[0])
    return torch.stack(outs).std(0).mean().item()


@torch.no_grad()
def batchnorm_train_eval_gap(batch_size: int, dim: int = 32, steps: int = 200, seed: int = 0,
                             mean: float = 3.0, std: float = 2.0) -> float:
    """Mean |train-mode output − eval-mode output| on fresh batches once running stats settled.

    Train mode normalises with the batch's own statistics, eval mode with the running ones;
    the two agree only when a batch is large enough to estimate the population statistics.
    """
    g = torch.Generator().manual_seed(seed)
    bn = BatchNorm1d(dim)
    for _ in range(steps):  # let the running statistics converge
        bn.train()(torch.randn(batch_size, dim, generator=g) * std + mean)
    gaps = []
    for _ in range(20):
        x = torch.randn(batch_size, dim, generator=g) * std + mean
        ref_mean, ref_var = bn.running_mean.clone(), bn.running_var.clone()
        train_out = bn.train()(x)
        bn.running_mean.copy_(ref_mean), bn.running_var.copy_(ref_var)  # keep eval stats fixed
        gaps.append((train_out - bn.eval()(x)).abs().mean().item())
    return sum(gaps) / len(gaps)


@torch.no_grad()
def invariance(norm: nn.Module, scale: float = 3.0, shift: float = 5.0, dim: int = 64,
               seed: int = 0) -> dict:
    """Max |Norm(x') − Norm(x)| when each token x is rescaled (x' = a·x) or shifted (x' = x + b)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, dim, generator=g)
    base = norm(x)
    shift_per_token = shift * torch.randn(4, 16, 1, generator=g)
    return {"scale": (norm(scale * x) - base).abs().max().item(),
            "shift": (norm(x + shift_per_token) - base).abs().max().item(),
            "scale_and_shift": (norm(scale * x + shift_per_token) - base).abs().max().item()}
