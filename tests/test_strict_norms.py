"""Norms against torch with an ε large enough to matter: where ε sits (inside or outside the
square root) changes the output by ~ε/σ, invisible at ε = 1e-5 but not at ε = 0.5."""
import pytest
import torch
import torch.nn as nn

from dpo_lab.arch.norms import BatchNorm1d, LayerNorm, RMSNorm

EPS = 0.5


@pytest.mark.parametrize("ours,ref", [
    (lambda: BatchNorm1d(16, eps=EPS), lambda: nn.BatchNorm1d(16, eps=EPS)),
    (lambda: LayerNorm(16, eps=EPS), lambda: nn.LayerNorm(16, eps=EPS)),
    (lambda: RMSNorm(16, eps=EPS), lambda: nn.RMSNorm(16, eps=EPS)),
], ids=["batchnorm", "layernorm", "rmsnorm"])
def test_large_eps_sits_inside_the_square_root(ours, ref):
    g = torch.Generator().manual_seed(0)
    x = 0.7 * torch.randn(8, 16, generator=g)  # variance ≈ ε: both terms of √(σ² + ε) count
    a, b = ours(), ref()
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-5)
    if isinstance(a, BatchNorm1d):  # eval mode: the running statistics meet the same ε
        a.eval(), b.eval()
        torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-5)
