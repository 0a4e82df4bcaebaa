"""Checks of notebook 12's exercises (optimizers). AdamW is graded against torch.optim.AdamW; the
Newton–Schulz iteration against the quintic written out here in float64 (not dpo_lab.optim.muon)."""
import torch

from dpo_lab.exercises import Wrong, exercise

A, B, C = 3.4445, -4.7750, 2.0315


def _adamw_step(fn, p, g, m, v, t, lr=0.1, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
    out = fn(p.clone(), g.clone(), m.clone(), v.clone(), t, lr, betas, eps, wd)
    if not (isinstance(out, tuple) and len(out) == 3 and all(torch.is_tensor(x) for x in out)):
        raise Wrong("return the tuple (new_param, new_m, new_v) of tensors")
    return out


def _close(a, b, tol=1e-10):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


@exercise("12.1", "one AdamW step, as torch.optim.AdamW")
def check_adamw_step(fn):
    """fn(param, grad, m, v, t, lr, betas, eps, weight_decay) -> (param, m, v) after step t (1-based)."""
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    # weight decay alone (g = 0): AdamW shrinks θ by lr·λ·θ, untouched by the moments
    p, m, v = _adamw_step(fn, one, zero, zero, zero, 1, lr=0.1, wd=0.5)
    if _close(p, one * (1 - 0.5)):
        raise Wrong("the decay is θ ← θ − lr·λ·θ: it is scaled by the learning rate")
    if _close(p, one - 0.1) or not _close(m, zero):
        raise Wrong("weight decay was added to the gradient (Adam + L2): AdamW decouples it, "
                    "θ ← θ − lr·λ·θ, outside the moments")
    if not _close(p, one * (1 - 0.1 * 0.5)):
        raise Wrong(f"with a zero gradient one step should give θ·(1 − lr·λ) = 0.95, got {p.tolist()}")
    # the first step from zero moments: bias correction makes it ≈ lr·sign(g) whatever |g|
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    b1, b2 = 0.9, 0.999
    p, m, v = _adamw_step(fn, one, g, zero, zero, 1)
    if not (_close(m, (1 - b1) * g) and _close(v, (1 - b2) * g * g)):
        raise Wrong("the moments are m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·g²")
    raw = one - 0.1 * m / (v.sqrt() + 1e-8)
    if _close(p, raw):
        raise Wrong("no bias correction: divide m by (1 − β1ᵗ) and v by (1 − β2ᵗ); "
                    "at t = 1 the moments are still ~(1−β) of their size")
    t2 = one - 0.1 * (m / (1 - b1 ** 2)) / ((v / (1 - b2 ** 2)).sqrt() + 1e-8)
    if _close(p, t2):
        raise Wrong("the bias correction uses t + 1: t is the 1-based step number, so the first step uses t = 1")
    # ε: added to √v̂ (after bias correction), where it matters for tiny gradients
    gs = torch.full((3,), 1e-7, dtype=torch.float64)
    p, m, v = _adamw_step(fn, one, gs, zero, zero, 1, eps=1e-6)
    vhat = v / (1 - b2)
    want = one - 0.1 * (m / (1 - b1)) / (vhat.sqrt() + 1e-6)
    if not _close(p, want):
        if _close(p, one - 0.1 * (m / (1 - b1)) / (vhat + 1e-6).sqrt()):
            raise Wrong("ε goes outside the square root: √v̂ + ε, not √(v̂ + ε)")
        raise Wrong("ε is added to √v̂, after the bias correction: θ ← θ − lr·m̂/(√v̂ + ε)")
    # many steps against torch.optim.AdamW
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    opt = torch.optim.AdamW([ref], lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v = ref.detach().clone(), torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)
    for t in range(1, 9):
        g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        ref.grad = g.clone()
        opt.step()
        p, m, v = _adamw_step(fn, p, g, m, v, t, lr=0.05, betas=(0.8, 0.95), eps=1e-8, wd=0.1)
        if not _close(p, ref.detach(), 1e-9):
            raise Wrong(f"step {t}: θ differs from torch.optim.AdamW by up to "
                        f"{(p - ref.detach()).abs().max().item():.3g} (decay before the Adam update, with θ_(t−1))")


def _ns64(G, steps, coeffs=(A, B, C), norm="fro"):
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() if norm == "fro" else torch.linalg.matrix_norm(X, 2))
    a, b, c = coeffs
    for _ in range(steps):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    return X.T if tall else X


@exercise("12.2", "the quintic Newton–Schulz iteration")
def check_newton_schulz(fn):
    """fn(G, steps) -> the Newton–Schulz orthogonalisation of the 2-D G, in G's dtype."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(8, 20), (20, 8)]:
        G = torch.randn(shape, generator=gen, dtype=torch.float64)
        got = fn(G.clone(), 5)
        if not torch.is_tensor(got) or got.shape != G.shape:
            raise Wrong(f"return a tensor of G's shape {tuple(G.shape)}, got "
                        f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        want = _ns64(G, 5)
        if _close(got, want, 1e-8):
            continue
        if _close(fn(10 * G.clone(), 5), 10 * got, 1e-6) or not torch.isfinite(got).all():
            raise Wrong("scale G first: X ← G/‖G‖_F puts every singular value in [0, 1], "
                        "where the iteration converges")
        if _close(got, _ns64(G, 5, norm="spec"), 1e-8):
            raise Wrong("normalise by the Frobenius norm ‖G‖_F (cheap), as Muon does, not the spectral norm")
        if _close(got, _ns64(G, 5, coeffs=(1.5, -0.5, 0.0)), 1e-8):
            raise Wrong("that is the cubic iteration; use the quintic (a, b, c) = (3.4445, −4.7750, 2.0315)")
        for k in (4, 6):
            if _close(got, _ns64(G, k), 1e-8):
                raise Wrong(f"that is {k} iterations: iterate exactly `steps` = 5 times")
        if _close(got, _ns64(G, 5, coeffs=(A, C, B)), 1e-8):
            raise Wrong("b multiplies (XXᵀ)X and c multiplies (XXᵀ)²X: X ← aX + b(XXᵀ)X + c(XXᵀ)²X")
        if got.dtype != G.dtype or _close(got, want, 0.05):
            raise Wrong("close, but not to float64 precision: compute in G's dtype (no bfloat16 here)")
        raise Wrong(f"differs from X ← aX + b(XXᵀ)X + c(XXᵀ)²X by up to {(got - want).abs().max().item():.3g}")
