import torch

from tests.wrong_solutions import wrong


@wrong("02.1", "unbiased")
def ln_unbiased_var(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias


@wrong("02.1", "ε is outside the square root")
def ln_eps_outside(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / (x.std(-1, keepdim=True, unbiased=False) + eps) * weight + bias


@wrong("02.1", "ε is missing")
def ln_no_eps(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / x.std(-1, keepdim=True, unbiased=False) * weight + bias


@wrong("02.1", "divided by the variance")
def ln_by_variance(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / (x.var(-1, keepdim=True, unbiased=False) + eps) * weight + bias


@wrong("02.1", "mean of squares of the *centred* values")
def ln_uncentred_variance(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


@wrong("02.1", "the mean is not subtracted")
def ln_no_centring(x, weight, bias, eps):
    return x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight + bias


@wrong("02.1", "over the batch (dim 0)")
def ln_over_batch(x, weight, bias, eps):
    mu = x.mean(0, keepdim=True)
    return (x - mu) / torch.sqrt(x.var(0, keepdim=True, unbiased=False) + eps) * weight + bias


@wrong("02.1", "over the sequence (dim 1)")
def ln_over_sequence(x, weight, bias, eps):
    mu = x.mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + eps) * weight + bias


@wrong("02.1", "the bias is scaled too")
def ln_bias_scaled(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return ((x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) + bias) * weight


@wrong("02.1", "bias is missing")
def ln_no_bias(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight


@wrong("02.2", "you used the variance")
def rms_variance(x, weight, eps):
    return x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight


@wrong("02.2", "that is LayerNorm")
def rms_is_layernorm(x, weight, eps):
    xc = x - x.mean(-1, keepdim=True)
    return xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * weight


@wrong("02.2", "sum of squares")
def rms_norm_not_rms(x, weight, eps):
    return x / torch.sqrt(x.norm(dim=-1, keepdim=True) ** 2 + eps) * weight


@wrong("02.2", "ε is outside the square root")
def rms_eps_outside(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


@wrong("02.2", "ε is missing")
def rms_no_eps(x, weight, eps):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * weight


@wrong("02.2", "the square root is missing")
def rms_no_sqrt(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


@wrong("02.2", "over the sequence (dim 1)")
def rms_over_sequence(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * weight


@wrong("02.2", "weight is missing")
def rms_no_weight(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
