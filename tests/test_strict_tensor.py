"""Vocabulary parallelism at its edges: every token (shard boundaries included) and logits large
enough that exp() overflows unless the global maximum is subtracted."""
import pytest

from tests._strict_ranks import strict_results

pytestmark = pytest.mark.distributed


def test_vocab_parallel_embedding_every_token():
    for r in strict_results():
        assert r["vocab_embed_all_tokens_err"] == 0.0


def test_vocab_parallel_cross_entropy_large_logits():
    for r in strict_results():
        assert r["vocab_ce_large_logits_err"] < 1e-6 and r["vocab_ce_large_logits_grad_err"] < 1e-6
