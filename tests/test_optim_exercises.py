"""Notebook 12's graders: the solutions in dpo_lab.optim pass (the wrong solutions: tests/test_exercises.py)."""
import pytest
import torch

from dpo_lab import exercises as ex
from dpo_lab.optim import newton_schulz



def _adamw_step(p, g, m, v, t, lr, betas, eps, wd):
    # the package's AdamW, one step from the given state (its state is set by hand)
    from dpo_lab.optim import AdamW
    p = p.clone().requires_grad_()
    opt = AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    opt.state[p] = {"step": t - 1, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    p.grad = g
    opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def test_the_package_solutions_pass():
    assert ex.grade(ex.get("12.1"), _adamw_step).passed, ex.grade(ex.get("12.1"), _adamw_step).message
    ns = lambda G, steps: newton_schulz(G, steps, dtype=G.dtype)
    assert ex.grade(ex.get("12.2"), ns).passed, ex.grade(ex.get("12.2"), ns).message
