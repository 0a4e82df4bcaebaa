"""Realistic wrong f, g and parallel MLPs for notebook 07 (run on ranks by the checks)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.wrong_solutions import wrong


def _all_reduce(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


class _Identity(torch.autograd.Function):      # what g's backward / f's forward should be alone
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReduceForward(torch.autograd.Function):  # a correct g
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReduceBoth(torch.autograd.Function):     # all-reduce in both directions
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceBackward(torch.autograd.Function):  # a correct f
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _AverageBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad) / dist.get_world_size()


class _InPlaceReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        dist.all_reduce(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


@wrong("07.1", "f and g are swapped")
def f_is_g(x):
    return _ReduceForward.apply(x)


@wrong("07.1", "f all-reduces in both directions")
def f_reduces_both(x):
    return _ReduceBoth.apply(x)


@wrong("07.1", "f's backward must all-reduce it")
def f_plain_identity(x):
    return _Identity.apply(x)


@wrong("07.1", "the gradient was averaged")
def f_averages(x):
    return _AverageBackward.apply(x)


@wrong("07.2", "g and f are swapped")
def g_is_f(x):
    return _ReduceBackward.apply(x)


@wrong("07.2", "x.grad is world_size× too large")
def g_reduces_both(x):
    return _ReduceBoth.apply(x)


@wrong("07.2", "g changed its input in place")
def g_in_place(x):
    return _InPlaceReduce.apply(x)


@wrong("07.2", "the sum was averaged")
def g_averages(x):
    return _ReduceForward.apply(x) / dist.get_world_size()


def _shards(mlp, up_dim=0, down_dim=1):
    r, n = dist.get_rank(), dist.get_world_size()
    up_w = mlp.up.weight.chunk(n, up_dim)[r]
    up_b = mlp.up.bias.chunk(n, 0)[r]
    down_w = mlp.down.weight.chunk(n, down_dim)[r]
    return up_w, up_b, down_w


@wrong("07.3", "(out_features, in_features)")
def mlp_splits_up_by_columns(x, mlp):  # "column-parallel" read as dim 1 of nn.Linear's weight
    up_w, up_b, down_w = _shards(mlp, up_dim=1)
    h = F.gelu(F.linear(_ReduceBackward.apply(x), up_w, up_b))
    return _ReduceForward.apply(F.linear(h, down_w)) + mlp.down.bias


@wrong("07.3", "down's bias was added world_size times")
def mlp_bias_before_reduce(x, mlp):
    up_w, up_b, down_w = _shards(mlp)
    h = F.gelu(F.linear(_ReduceBackward.apply(x), up_w, up_b))
    return _ReduceForward.apply(F.linear(h, down_w, mlp.down.bias))


@wrong("07.3", "only its partial sum: leave the parallel region with g")
def mlp_no_g(x, mlp):
    up_w, up_b, down_w = _shards(mlp)
    h = F.gelu(F.linear(_ReduceBackward.apply(x), up_w, up_b))
    return F.linear(h, down_w) + mlp.down.bias


@wrong("07.3", "enter the parallel region with f")
def mlp_no_f(x, mlp):
    up_w, up_b, down_w = _shards(mlp)
    h = F.gelu(F.linear(x, up_w, up_b))
    return _ReduceForward.apply(F.linear(h, down_w)) + mlp.down.bias


@wrong("07.3", "gradients are world_size× too large")
def mlp_g_reduces_both(x, mlp):  # its g all-reduces backward too
    up_w, up_b, down_w = _shards(mlp)
    h = F.gelu(F.linear(_ReduceBackward.apply(x), up_w, up_b))
    return _ReduceBoth.apply(F.linear(h, down_w)) + mlp.down.bias


@wrong("07.3", "every rank computed the whole MLP")
def mlp_unsplit(x, mlp):
    h = F.gelu(F.linear(_ReduceBackward.apply(x), mlp.up.weight, mlp.up.bias))
    return _ReduceForward.apply(F.linear(h, mlp.down.weight)) + mlp.down.bias


@wrong("07.3", "no gradient reached mlp.up.weight")
def mlp_detached_shards(x, mlp):  # copies the shards out of autograd
    up_w, up_b, down_w = (t.detach().clone().requires_grad_() for t in _shards(mlp))
    h = F.gelu(F.linear(_ReduceBackward.apply(x), up_w, up_b))
    return _ReduceForward.apply(F.linear(h, down_w)) + mlp.down.bias


@wrong("07.2", "g's forward must all-reduce it")
def g_plain_identity(x):  # forgot the reduction
    return _Identity.apply(x)


@wrong("07.3", "no gradient reached x")
def mlp_reduces_a_detached_copy(x, mlp):  # detached to dodge autograd's in-place error
    up_w, up_b, down_w = _shards(mlp)
    h = F.gelu(F.linear(x, up_w, up_b))
    y = F.linear(h, down_w).detach()
    dist.all_reduce(y)
    return y + mlp.down.bias
