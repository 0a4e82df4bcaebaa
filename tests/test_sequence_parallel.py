"""Sequence parallelism equals TP alone; activation memory per rank matches the derived formula."""
import pytest
import torch
import torch.nn as nn

from dpo_lab.parallel.sequence import SavedActivations, block_activation_bytes, korthikanti_bytes
from tests.test_tensor_parallel import CONFIGS, TOL, tp_results


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_tensor_parallel(world):
    layers = CONFIGS[world]["n_layers"]
    for r in tp_results(world):
        assert r["sp_loss_err"] < TOL and r["sp_grad_err"] < TOL
        # every TP all-reduce became a reduce-scatter + all-gather pair; the CE keeps its 3 scalars
        fwd, bwd = r["sp_collectives_forward"], r["sp_collectives_backward"]
        assert fwd[("reduce_scatter", "forward")] == 1 + 2 * layers
        assert fwd[("all_gather", "forward")] == 2 * layers + 1
        assert fwd[("all_reduce", "forward")] == 3
        assert bwd == {("reduce_scatter", "backward"): 2 * layers + 1,
                       ("all_gather", "backward"): 1 + 2 * layers}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_measured_activation_bytes_match_formula(world):
    c = CONFIGS[world]
    s, b, h, a, k = c["seq"], 2, c["dim"], c["n_heads"], c["n_kv_heads"]
    for r in tp_results(world):
        assert r["act_bytes_none"] == block_activation_bytes(s, b, h, a, n_kv_heads=k)
        assert r["act_bytes_tp"] == block_activation_bytes(s, b, h, a, t=world, n_kv_heads=k)
        assert r["act_bytes_sp"] == block_activation_bytes(s, b, h, a, t=world, sequence_parallel=True,
                                                           n_kv_heads=k)
        assert r["act_bytes_none"] > r["act_bytes_tp"] > r["act_bytes_sp"]


def test_korthikanti_formulas():
    s, b, h, a = 2048, 1, 4096, 32
    none = korthikanti_bytes(s, b, h, a)
    assert none == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_bytes(s, b, h, a, 8, True) == pytest.approx(none / 8)  # SP shards everything
    tp = korthikanti_bytes(s, b, h, a, 8)
    assert none / 8 < tp < none  # TP alone leaves 10·sbh replicated
    # Table 2 of the paper, term by term: 5as/h = 80 here
    assert tp == pytest.approx(s * b * h * (10 + 24 / 8 + 80 / 8), rel=1e-12)
    assert korthikanti_bytes(s, b, h, a, 8, selective_recompute=True) == pytest.approx(s * b * h * (10 + 24 / 8))
    assert korthikanti_bytes(s, b, h, a, 8, True, True) == pytest.approx(s * b * h * 34 / 8)


def test_saved_activations_counts_each_storage_once_and_skips_weights():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(lin) as mem:
        h = lin(x)
        y = nn.functional.gelu(h) * 2
    # linear keeps its input x; gelu keeps its input h; the weight is not an activation
    assert mem.bytes == x.numel() * 4 + h.numel() * 4
    y.sum().backward()  # the hooks do not disturb autograd
    assert lin.weight.grad is not None
