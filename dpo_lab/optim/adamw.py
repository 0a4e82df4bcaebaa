"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), from scratch.

Per parameter θ with gradient g, at step t (1-based):
    m ← β1 m + (1−β1) g            v ← β2 v + (1−β2) g²
    m̂ = m / (1−β1ᵗ)                v̂ = v / (1−β2ᵗ)          (bias correction: m, v start at 0)
    θ ← θ − ηλθ  (decoupled decay) θ ← θ − η m̂ / (√v̂ + ε)
`adam_l2=True` is Adam with L2 regularisation instead: g ← g + λθ before the moments, so the decay
is divided by √v̂ like the gradient (large-gradient weights are barely decayed). That is the
difference the paper's title is about. amsgrad is not implemented (not used in this workbook).
"""
import torch


class PerParameter(torch.optim.Optimizer):
    """torch's Optimizer.step protocol (closure, param groups, parameters without a gradient
    skipped) around `update(p, g, group, state)`, which each optimizer here writes for one parameter."""

    def update(self, p, g, group: dict, state: dict):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, group, self.state[p])
        return loss


def adam_moments_(m, v, g, b1: float, b2: float):
    """Adam's moments in place: m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)


class AdamW(PerParameter):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 adam_l2=False):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      adam_l2=adam_l2))

    def update(self, p, g, group, state):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = 0  # a Python int: not counted as optimizer-state bytes
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if group["adam_l2"]:
            g = g + wd * p  # L2: the decay joins the gradient and gets Adam-normalised
        else:
            p.mul_(1 - lr * wd)  # decoupled: shrink θ directly, independent of v
        adam_moments_(m, v, g, b1, b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def adam_l2(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """Adam with L2 regularisation (torch.optim.Adam's `weight_decay`), for the comparison."""
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_l2=True)
