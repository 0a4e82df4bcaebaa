import torch

from tests.wrong_solutions import wrong

A, B, C = 3.4445, -4.7750, 2.0315


def _adamw(p, g, m, v, t, lr, betas, eps, wd, l2=False, decay_lr=True, correct=True, t_shift=0,
           eps_inside=False):
    b1, b2 = betas
    if l2:
        g = g + wd * p
    else:
        p = p * (1 - (lr * wd if decay_lr else wd))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    t = t + t_shift
    mh, vh = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if correct else (m, v)
    denom = (vh + eps).sqrt() if eps_inside else vh.sqrt() + eps
    return p - lr * mh / denom, m, v


@wrong("12.1", "Adam + L2")
def adam_l2(p, g, m, v, t, lr, betas, eps, wd):
    return _adamw(p, g, m, v, t, lr, betas, eps, wd, l2=True)


@wrong("12.1", "scaled by the learning rate")
def decay_without_lr(p, g, m, v, t, lr, betas, eps, wd):
    return _adamw(p, g, m, v, t, lr, betas, eps, wd, decay_lr=False)


@wrong("12.1", "no bias correction")
def no_bias_correction(p, g, m, v, t, lr, betas, eps, wd):
    return _adamw(p, g, m, v, t, lr, betas, eps, wd, correct=False)


@wrong("12.1", "uses t + 1")
def off_by_one(p, g, m, v, t, lr, betas, eps, wd):
    return _adamw(p, g, m, v, t, lr, betas, eps, wd, t_shift=1)


@wrong("12.1", "outside the square root")
def eps_inside_sqrt(p, g, m, v, t, lr, betas, eps, wd):
    return _adamw(p, g, m, v, t, lr, betas, eps, wd, eps_inside=True)


@wrong("12.1", "decay before the Adam update")
def decay_after_update(p, g, m, v, t, lr, betas, eps, wd):
    new, m, v = _adamw(p, g, m, v, t, lr, betas, eps, 0.0)
    return new - lr * wd * new, m, v


def _ns(G, steps, coeffs=(A, B, C), normalise=True, spectral=False, dtype=None):
    X = G.to(dtype) if dtype else G
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    if normalise:
        X = X / (torch.linalg.matrix_norm(X, 2) if spectral else X.norm())
    a, b, c = coeffs
    for _ in range(steps):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    X = X.T if tall else X
    return X.to(G.dtype) if dtype else X


@wrong("12.2", "scale G first")
def ns_unnormalised(G, steps):
    return _ns(G, steps, normalise=False)


@wrong("12.2", "not the spectral norm")
def ns_spectral(G, steps):
    return _ns(G, steps, spectral=True)


@wrong("12.2", "cubic iteration")
def ns_cubic(G, steps):
    return _ns(G, steps, coeffs=(1.5, -0.5, 0.0))


@wrong("12.2", "iterate exactly")
def ns_one_short(G, steps):
    return _ns(G, steps - 1)


@wrong("12.2", "b multiplies")
def ns_swapped(G, steps):
    return _ns(G, steps, coeffs=(A, C, B))


@wrong("12.2", "compute in G's dtype")
def ns_bf16(G, steps):
    return _ns(G, steps, dtype=torch.bfloat16)


@wrong("12.2", "of G's shape")
def ns_transposed(G, steps):
    return _ns(G, steps).T
