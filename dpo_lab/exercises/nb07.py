"""Checks of notebook 07's exercises (Megatron's f and g, a column-then-row parallel MLP), on ranks.

Each check runs world sizes 2 and 3 (dpo_lab.exercises.on_ranks's `run_check`, which also turns a
deadlocked rank into a verdict) and compares the student's operator, forward and backward, with
what it must equal on every rank: for f and g, sums of the ranks' tensors computed locally from
their seeds (no collective shared with the code under test); for the MLP, the unsplit `MLP`'s
output and gradients in the same process.
"""
import torch
import torch.distributed as dist

from dpo_lab.exercises import Wrong, exercise, expect_close
from dpo_lab.exercises.on_ranks import LAUNCH_S, any_rank, call_on_rank, run_check, verdict_of

SHAPE = (3, 4)


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def _forward_backward(fn, x, grad):
    """y = fn(x) then y.backward(grad), both on the student's thread; (y, x.grad)."""
    y = call_on_rank(fn, x)
    if not torch.is_tensor(y):
        raise Wrong(f"return a tensor, got {type(y).__name__}")
    if y.shape != x.shape:
        raise Wrong(f"the output has shape {tuple(y.shape)}, expected the input's {tuple(x.shape)}")
    if not y.requires_grad:
        raise Wrong("the output does not require grad: build it with an autograd.Function "
                    "(MyFunction.apply(x)), not under torch.no_grad() or from .detach()")
    call_on_rank(lambda: y.backward(grad))
    if x.grad is None:
        raise Wrong("no gradient reached x: the output was made outside autograd")
    return y.detach(), x.grad


# --- 07.1 f: identity forward, all-reduce backward ---------------------------------------------

def f_rank(fn):
    r, n = dist.get_rank(), dist.get_world_size()
    x = _randn(0).requires_grad_()   # f's input is replicated: the same on every rank
    before = x.detach().clone()
    grads = [_randn(100 + q) for q in range(n)]  # each rank's partial input-gradient
    y, gx = _forward_backward(fn, x, grads[r])
    reduced_fwd, total = _close(y, n * before), sum(grads)
    verdict = None
    if reduced_fwd and _close(gx, grads[r]):
        verdict = ("f and g are swapped: f is the identity forward and all-reduces the gradient "
                   "backward (g is the other way round)")
    elif reduced_fwd and _close(gx, total):
        verdict = ("f all-reduces in both directions: its output is world_size× the input. Forward "
                   "is the identity (every rank already holds the whole x); only backward all-reduces")
    elif not _close(y, before):
        verdict = verdict_of(lambda: expect_close(y, before, "f's output (it must equal its input)", hints={
            n: "f's forward is the identity; it's g that all-reduces forward"}))
    elif _close(gx, grads[r]):
        verdict = (f"x.grad on rank {r} is only its own part of the gradient: f's backward must "
                   f"all-reduce it (each rank's gradient of a replicated input is a partial sum)")
    else:
        verdict = verdict_of(lambda: expect_close(gx, total, f"x.grad on rank {r} after f's backward", hints={
            round(1 / n, 6): "the gradient was averaged: the gradient of a copied input is the sum "
                             "of the copies' gradients (all_reduce with SUM, no division)",
            n: "an all-reduce too many in backward?"}))
    any_rank(verdict is not None)
    return verdict


@exercise("07.1", "f: identity forward, all-reduce backward", timeout=4 * LAUNCH_S)
def check_f(fn):
    """fn(x) on every rank with the same x: the output must equal x, and x.grad the sum of every
    rank's output-gradient."""
    run_check(f_rank, fn)


# --- 07.2 g: all-reduce forward, identity backward ---------------------------------------------

def g_rank(fn):
    r, n = dist.get_rank(), dist.get_world_size()
    parts = [_randn(200 + q) for q in range(n)]  # each rank's partial sum
    x = parts[r].clone().requires_grad_()
    grad = _randn(300)   # after g everything is replicated: so is the output-gradient
    y, gx = _forward_backward(fn, x, grad)
    total = sum(parts)
    identity_fwd, reduced_bwd = _close(y, parts[r]), _close(gx, n * grad)
    if identity_fwd and reduced_bwd:
        verdict = ("g and f are swapped: g all-reduces forward (summing the ranks' partial outputs) "
                   "and passes the gradient through unchanged backward")
    elif not torch.equal(x.detach(), parts[r]):
        verdict = ("g changed its input in place (dist.all_reduce works in place): all-reduce a copy, "
                   "x.clone(), and return that")
    elif identity_fwd:
        verdict = (f"g's output on rank {r} is its own partial sum: g's forward must all-reduce it")
    elif not _close(y, total):
        verdict = verdict_of(lambda: expect_close(y, total, f"g's output on rank {r}", hints={
            round(1 / n, 6): "the sum was averaged: the row-parallel partial outputs add up to the "
                             "result (all_reduce with SUM, no division)"}))
    elif reduced_bwd:
        verdict = ("g all-reduces in both directions: x.grad is world_size× too large. The gradient of "
                   "a sum with respect to each term is the output's gradient itself: g's backward is "
                   "the identity")
    else:
        verdict = verdict_of(lambda: expect_close(gx, grad, f"x.grad on rank {r} after g's backward", hints={
            round(1 / n, 6): "the gradient was divided by world_size: g's backward is the identity"}))
    any_rank(verdict is not None)
    return verdict


@exercise("07.2", "g: all-reduce forward, identity backward", timeout=4 * LAUNCH_S)
def check_g(fn):
    """fn(x) on every rank with a different x: the output must be the sum of the ranks' x, and
    x.grad the output-gradient unchanged."""
    run_check(g_rank, fn)


# --- 07.3 column-then-row parallel MLP ------------------------------------------------------------

DIM, HIDDEN = 6, 24   # HIDDEN divides by 2 and 3; DIM doesn't need to


def _mlp():
    from dpo_lab.arch.transformer import MLP
    torch.manual_seed(0)  # the same weights on every rank, as after loading a checkpoint
    return MLP(DIM, HIDDEN)


SPLIT = ("nn.Linear keeps its weight as (out_features, in_features): column-parallel `up` takes rows "
         "[rank·H/t, (rank+1)·H/t) of up.weight (dim 0, with the same slice of up.bias), row-parallel "
         "`down` takes the same columns of down.weight (dim 1)")


def mlp_rank(fn):
    r, n = dist.get_rank(), dist.get_world_size()
    mlp, ref = _mlp(), _mlp()
    x = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_()
    want = ref(x_ref)
    want.backward(grad)
    x = x.clone().requires_grad_()
    try:
        y = call_on_rank(fn, x, mlp)
    except RuntimeError as e:
        if "shape" not in str(e) and "size" not in str(e):
            raise
        raise Wrong(f"the shapes don't fit ({str(e).splitlines()[0]}): {SPLIT}") from e
    if not torch.is_tensor(y) or y.shape != want.shape:
        raise Wrong(f"return the MLP's output, shape {tuple(want.shape)}; got "
                    + (str(tuple(y.shape)) if torch.is_tensor(y) else type(y).__name__)
                    + (f". {SPLIT}" if torch.is_tensor(y) else ""))
    if y.requires_grad:
        call_on_rank(lambda: y.backward(grad))
    # The checker's own reductions (on every rank, whatever its verdict): partial sums?
    total = y.detach().clone()
    dist.all_reduce(total)
    gx_total = x.grad.clone() if x.grad is not None else torch.zeros_like(x)
    dist.all_reduce(gx_total)
    want, b = want.detach(), ref.down.bias.detach()
    verdict = None
    if not _close(y.detach(), want):
        if _close(y.detach(), want + (n - 1) * b):
            verdict = "down's bias was added world_size times: add it once, after g (the reduction)"
        elif any(_close(total, want + k * b) for k in (0, n - 1)):
            verdict = (f"the output on rank {r} is only its partial sum: leave the parallel region "
                       f"with g (reduce_from_tp), which all-reduces it")
        elif _close(y.detach(), n * (want - b) + b):
            verdict = ("every rank computed the whole MLP and g summed world_size copies: each rank "
                       f"uses only its slice. {SPLIT}")
        else:
            verdict = verdict_of(lambda: expect_close(y, want, f"the output on rank {r}")) + (
                ". GELU must see whole hidden features: split `up` by its output features")
    elif not y.requires_grad or x.grad is None:
        verdict = ("no gradient reached x: build the output from x and the weight slices with autograd "
                   "(no .detach(), no torch.no_grad())")
    else:
        verdict = _grad_verdict(mlp, ref, x.grad, gx_total, x_ref.grad, r, n)
    any_rank(verdict is not None)
    return verdict


def _grad_verdict(mlp, ref, gx, total, want, r, n) -> str | None:
    hints = {n: "the gradients are world_size× too large: an all-reduce in g's backward? g's backward "
                "is the identity"}
    if not _close(gx, want):
        if _close(total, want):
            return (f"x.grad on rank {r} is only its part: enter the parallel region with f "
                    f"(copy_to_tp), whose backward all-reduces the input-gradient")
        return verdict_of(lambda: expect_close(gx, want, f"x.grad on rank {r}", hints=hints))
    rows = slice(r * HIDDEN // n, (r + 1) * HIDDEN // n)
    for name, dim in (("up.weight", 0), ("up.bias", 0), ("down.weight", 1), ("down.bias", None)):
        p, p_ref = mlp.get_parameter(name), ref.get_parameter(name)
        if p.grad is None:
            return (f"no gradient reached mlp.{name}: use a slice of the weight itself "
                    f"(mlp.up.weight[lo:hi], a view), not a detached copy")
        got, exp = p.grad, p_ref.grad
        if dim is not None:
            mine = [slice(None)] * p.dim()
            mine[dim] = rows
            got, exp = got[tuple(mine)], exp[tuple(mine)]
        v = verdict_of(lambda: expect_close(got, exp, f"rank {r}'s gradient of its slice of mlp.{name}",
                                            hints=hints))
        if v:
            return v
    return None


@exercise("07.3", "column-then-row parallel MLP", timeout=4 * LAUNCH_S)
def check_parallel_mlp(fn):
    """fn(x, mlp) on every rank, with the same x and the same unsplit MLP: the output and x.grad
    must equal the unsplit MLP's, and each weight's gradient its slice of the unsplit gradient."""
    run_check(mlp_rank, fn)
