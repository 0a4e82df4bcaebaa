"""Library edges that must raise a clear error, on every rank, instead of misbehaving or hanging."""
import math

import pytest
import torch

from dpo_lab.arch.attention import Attention, rope_tables
from dpo_lab.dpo.loss import dpo_loss
from dpo_lab.parallel import RankFailed, launch
from tests import _edge_ranks

# A hang guard only: a check that lets one rank wait for another fails by timing out.
TIMEOUT = 60


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan])
def test_dpo_loss_rejects_non_positive_beta(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=f"beta must be > 0, got {beta}"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_rejects_mismatched_shapes():
    x, y = torch.zeros(4), torch.zeros(4, 1)  # (4,) − (4, 1) would broadcast to a (4, 4) loss
    with pytest.raises(ValueError, match=r"ref_rejected has shape \(4, 1\), policy_chosen has \(4,\)"):
        dpo_loss(x, x, x, y)
    with pytest.raises(ValueError, match=r"policy_rejected has shape \(3,\), policy_chosen has \(4,\)"):
        dpo_loss(x, torch.zeros(3), x, x)


def test_ipo_needs_both_lengths():
    x, n = torch.zeros(2), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="got chosen_lengths alone"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=n)
    with pytest.raises(ValueError, match="got rejected_lengths alone"):
        dpo_loss(x, x, x, x, loss_type="ipo", rejected_lengths=n)
    with pytest.raises(ValueError, match=r"rejected_lengths has shape \(3,\), policy_chosen has \(2,\)"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=n, rejected_lengths=torch.tensor([1, 2, 3]))
    losses, _, _ = dpo_loss(x, x, x, x, beta=0.5, loss_type="ipo", chosen_lengths=n, rejected_lengths=n)
    torch.testing.assert_close(losses, torch.ones(2))  # (0 − 1/(2·0.5))² = 1: both lengths still work


@pytest.mark.parametrize("n_kv_heads", [0, -2])
def test_attention_rejects_fewer_than_one_kv_head(n_kv_heads):
    with pytest.raises(ValueError, match=f"n_kv_heads={n_kv_heads} must be >= 1"):
        Attention(32, 4, n_kv_heads)
    assert Attention(32, 4, None).n_kv_heads == 4  # None still means multi-head attention


def test_attention_rejects_a_head_dim_rope_cannot_rotate():
    with pytest.raises(ValueError, match="head_dim = dim // n_heads = 12//4 = 3 is odd"):
        Attention(12, 4)
    with pytest.raises(ValueError, match="head_dim=5 is odd"):
        rope_tables(5, torch.arange(3))


@pytest.mark.distributed
def test_expert_parallel_with_unequal_token_counts_raises_on_every_rank():
    with pytest.raises(RankFailed, match="rank 1 has 9 tokens, rank 0 has 8: expert parallel needs "
                                         r"equal token counts per rank \(pad or drop\)"):
        launch(_edge_ranks.expert_unequal_tokens, 2, kwargs=dict(tokens_per_rank=8), timeout=TIMEOUT)


@pytest.mark.distributed
@pytest.mark.parametrize("case,message", [
    ("shape", r"rank 1: micro-batch 2 has shape \(3, 8\), micro-batch 0 has \(2, 8\)"),
    ("count", "rank 1: the schedule runs 5 micro-batches, 4 were given"),
], ids=["shape", "count"])
def test_pipeline_with_bad_microbatches_raises_on_every_rank(case, message):
    with pytest.raises(RankFailed, match=message):
        launch(_edge_ranks.pipeline_bad_microbatches, 2, args=(case,), timeout=TIMEOUT)


@pytest.mark.distributed
def test_fsdp_on_a_bf16_module_raises_on_every_rank():
    with pytest.raises(RankFailed, match=r"rank 1: parameter '1.weight' is torch.bfloat16: "
                                         "FullyShardedDataParallel keeps fp32 master weights"):
        launch(_edge_ranks.fsdp_low_precision, 2, args=(1,), timeout=TIMEOUT)
