"""Checks of notebook 02's exercises (normalisation): LayerNorm and RMSNorm forward, against
torch's F.layer_norm and F.rms_norm (what nn.LayerNorm and nn.RMSNorm call)."""
import torch
import torch.nn.functional as F

from dpo_lab.exercises import Wrong, exercise, expect_close


def _inputs(seed=0):
    """(B, T, D) = (3, 5, 8), float64 so that ε-sized differences stand out of rounding; rows of
    very different scales (ε matters for the small ones); weight and bias away from 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64) + 0.7
    x = x * torch.logspace(-2, 1, 5, dtype=torch.float64)[None, :, None]
    w = 1 + 0.5 * torch.randn(8, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(8, generator=g, dtype=torch.float64)
    return x, w, b


def _diagnose(got, want, candidates, what):
    """Raise the diagnosis of the first wrong formula that `got` matches, else compare with `want`.
    Tolerances admit a float32 computation (as dpo_lab's RMSNorm does) but no formula slip."""
    if not torch.is_tensor(got):
        raise Wrong(f"return a tensor, got {type(got).__name__}")
    if got.shape == want.shape:
        for candidate, diagnosis in candidates:
            if torch.allclose(got.double(), candidate, atol=1e-6, rtol=1e-5) and not torch.allclose(
                    candidate, want, atol=1e-6, rtol=1e-5):
                raise Wrong(diagnosis)
    expect_close(got, want, what, atol=1e-6, rtol=1e-5)


@exercise("02.1", "LayerNorm forward")
def check_layer_norm(fn):
    """fn(x, weight, bias, eps) -> LayerNorm over the last dim, compared with F.layer_norm."""
    x, w, b = _inputs()
    for eps in (1e-5, 0.1):  # a large ε tells "inside the sqrt" from "outside" and from "none"
        want = F.layer_norm(x, (x.shape[-1],), w, b, eps)

        def ln(dim=-1, var=lambda v, d: v.var(d, keepdim=True, unbiased=False), centre=True,
               denom=lambda var: torch.sqrt(var + eps)):
            mu = x.mean(dim, keepdim=True)
            return ((x - mu) if centre else x) / denom(var(x, dim)) * w + b
        candidates = [
            (ln(var=lambda v, d: v.var(d, keepdim=True, unbiased=True)),
             "torch.var is unbiased (divides by D−1) by default: LayerNorm uses the biased variance, "
             "x.var(-1, unbiased=False) or ((x − μ)²).mean(-1)"),
            (ln(denom=lambda var: torch.sqrt(var) + eps),
             "ε is outside the square root: divide by √(σ² + ε), not √σ² + ε"),
            (ln(denom=lambda var: torch.sqrt(var)), "ε is missing: divide by √(σ² + ε)"),
            (ln(denom=lambda var: var + eps),
             "you divided by the variance: divide by the standard deviation √(σ² + ε)"),
            (ln(var=lambda v, d: v.pow(2).mean(d, keepdim=True)),
             "the variance is the mean of squares of the *centred* values: mean((x − μ)²), "
             "not mean(x²)"),
            (ln(centre=False), "the mean is not subtracted: the numerator is x − μ"),
            (ln(dim=0), "you normalised over the batch (dim 0): LayerNorm normalises each token over "
                        "its features, the last dim"),
            (ln(dim=1), "you normalised over the sequence (dim 1): LayerNorm normalises each token over "
                        "its features, the last dim"),
            (ln() - b + b * w, "the bias is scaled too: y = x̂·weight + bias"),
            ((ln() - b) / w + b, "weight is missing: y = x̂·weight + bias"),
            (ln() - b, "bias is missing: y = x̂·weight + bias"),
        ]
        got = fn(x.clone(), w.clone(), b.clone(), eps)
        _diagnose(got, want, candidates, f"the output at ε={eps}")
    const = torch.full((2, 8), 3.0, dtype=torch.float64)  # zero variance: only ε keeps it finite
    expect_close(fn(const, w, b, 1e-5), F.layer_norm(const, (8,), w, b, 1e-5),
                 "the output for a constant token", atol=1e-6)


@exercise("02.2", "RMSNorm forward")
def check_rms_norm(fn):
    """fn(x, weight, eps) -> RMSNorm over the last dim, compared with F.rms_norm (nn.RMSNorm's)."""
    x, w, _ = _inputs(seed=1)
    D = x.shape[-1]
    for eps in (1e-6, 0.1):
        want = F.rms_norm(x, (D,), w, eps)

        def rms(dim=-1, ms=lambda v, d: v.pow(2).mean(d, keepdim=True), denom=lambda s: torch.sqrt(s + eps)):
            return x / denom(ms(x, dim)) * w
        candidates = [
            (rms(ms=lambda v, d: v.var(d, keepdim=True, unbiased=False)),
             "you used the variance (mean subtracted): RMSNorm divides by √(mean(x²) + ε), no centring"),
            (rms(ms=lambda v, d: v.var(d, keepdim=True)),
             "you used the variance (mean subtracted): RMSNorm divides by √(mean(x²) + ε), no centring"),
            ((x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w,
             "that is LayerNorm: RMSNorm neither subtracts the mean nor uses the variance, "
             "it divides x by √(mean(x²) + ε)"),
            (rms(ms=lambda v, d: v.pow(2).sum(d, keepdim=True)),
             "you used the sum of squares (‖x‖², as x.norm() gives): the RMS is √(mean(x²)), "
             "a factor √D smaller"),
            (rms(denom=lambda s: torch.sqrt(s) + eps),
             "ε is outside the square root: divide by √(mean(x²) + ε)"),
            (rms(denom=lambda s: torch.sqrt(s)), "ε is missing: divide by √(mean(x²) + ε)"),
            (rms(denom=lambda s: s + eps), "the square root is missing: divide by √(mean(x²) + ε)"),
            (rms(ms=lambda v, d: v.abs().mean(d, keepdim=True) ** 2),
             "you squared the mean absolute value: the RMS is the root of the mean of the squares"),
            (rms(dim=0), "you normalised over the batch (dim 0): RMSNorm normalises each token over its "
                         "features, the last dim"),
            (rms(dim=1), "you normalised over the sequence (dim 1): RMSNorm normalises each token over "
                         "its features, the last dim"),
            (rms() / w, "weight is missing: y = x / √(mean(x²) + ε) · weight"),
        ]
        got = fn(x.clone(), w.clone(), eps)
        _diagnose(got, want, candidates, f"the output at ε={eps}")
    zero = torch.zeros(2, D, dtype=torch.float64)  # an all-zero token (padding): ε keeps it 0, not NaN
    expect_close(fn(zero, w, 1e-6), F.rms_norm(zero, (D,), w, 1e-6), "the output for an all-zero token")
