"""Megatron tensor parallelism on 2 and 4 real ranks against the unsplit modules."""
import functools

import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.sequence import tp_sp_check_rank

pytestmark = pytest.mark.distributed
# GQA on both sizes: 2 KV heads shared by 4 query heads (t=2), 4 KV heads by 8 (t=4).
CONFIGS = {2: dict(n_heads=4, n_kv_heads=2, dim=32, seq=8, n_layers=2),
           4: dict(n_heads=8, n_kv_heads=4, dim=32, seq=8, n_layers=2)}
TOL = 2e-5


@functools.lru_cache(maxsize=None)
def tp_results(world: int) -> tuple:
    """One launch per world size, shared with test_sequence_parallel."""
    return tuple(launch(tp_sp_check_rank, world, kwargs=CONFIGS[world], timeout=240))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("part", ["mlp", "attn"])
def test_parallel_block_equals_unsplit_forward_and_gradients(world, part):
    for r in tp_results(world):
        assert r[f"{part}_forward_err"] < TOL, r
        assert r[f"{part}_input_grad_err"] < TOL, r
        assert r[f"{part}_weight_grad_err"] < TOL, r


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("part", ["mlp", "attn"])
def test_one_all_reduce_per_block_and_direction(world, part):
    for r in tp_results(world):
        assert r[f"{part}_collectives_forward"] == {("all_reduce", "forward"): 1}
        assert r[f"{part}_collectives_backward"] == {("all_reduce", "backward"): 1}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_embedding_and_cross_entropy_equal_torch(world):
    for r in tp_results(world):
        assert r["vocab_embed_err"] < TOL and r["vocab_embed_grad_err"] < TOL
        assert r["vocab_ce_err"] < TOL and r["vocab_ce_grad_err"] < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_whole_model_under_tp_equals_unsplit(world):
    layers = CONFIGS[world]["n_layers"]
    for r in tp_results(world):
        assert r["tp_loss_err"] < TOL and r["tp_grad_err"] < TOL
        # embedding g + 2 per layer (attention, MLP) + 3 scalar all-reduces in the cross-entropy
        assert r["tp_collectives_forward"] == {("all_reduce", "forward"): 1 + 2 * layers + 3}
        # 2 per layer + the head's f; the embedding's g and the cross-entropy need none
        assert r["tp_collectives_backward"] == {("all_reduce", "backward"): 2 * layers + 1}
