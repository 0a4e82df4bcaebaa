"""The planner's output-layer memory (`cost.logits_bytes`) against the bytes torch really
materialises when lesson 06's code computes DPO log-probs on a tiny model.

Measured with torch's own `MemTracker` (every tensor storage created, freed and the peak), on a
tiny Qwen2 at two vocabulary sizes: everything else is the same, so the difference of the peaks is
what the output layer costs for the extra vocabulary entries."""
import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from dpo_lab.dpo.batching import concatenated_forward
from dpo_lab.dpo.trainer import policy_forward
from dpo_lab.models import build_tiny_model
from dpo_lab.parallel import cost

SEQS, T = 4, 64  # one micro-batch of 2 pairs: chosen + rejected rows
# one narrow layer: the output layer is all that grows with V, and the test stays fast
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)


def _peak_bytes(vocab: int, dtype, reference_after: bool) -> int:
    """Peak bytes of activations and temporaries of one DPO step's forward and backward, as the
    trainer runs it: policy forward, then the reference forward under no_grad, then backward."""
    torch.manual_seed(0)
    policy = build_tiny_model(vocab_size=vocab, **SHAPE).to(dtype)
    ref = build_tiny_model(vocab_size=vocab, **SHAPE).to(dtype)
    ids = torch.randint(0, vocab, (SEQS, T))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids))
    tracker = MemTracker()
    tracker.track_external(policy, ref)
    with tracker:
        pc, pr, *_ = policy_forward(policy, batch)
        loss = -(pc - pr).sum()
        if reference_after:
            with torch.no_grad():
                rc, rr = concatenated_forward(ref, batch)
            loss = loss + (rc - rr).sum()
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    # weights (and the LM head's gradient) grow with the vocabulary too: leave them out
    return sum(v for k, v in peak.items() if k != "Total" and k.name not in ("PARAM", "GRAD", "BUFFER"))


@pytest.mark.parametrize("dtype,logit_bytes,reference_after", [
    (torch.bfloat16, 2, True),    # 4 + (2 + 4 + 4) = 14 bytes per logit entry
    (torch.float32, 4, True),     # .float() copies nothing: 4 + 4 + 4 = 12
    (torch.float32, 4, False),    # no reference pass: the backward's three fp32 copies, 12
    (torch.bfloat16, 2, False),
])
def test_logits_bytes_match_a_measured_peak(dtype, logit_bytes, reference_after):
    v1, v2 = 1024, 2048
    measured = _peak_bytes(v2, dtype, reference_after) - _peak_bytes(v1, dtype, reference_after)
    model = (cost.logits_bytes(T, SEQS, v2, logit_bytes=logit_bytes, reference_after=reference_after)
             - cost.logits_bytes(T, SEQS, v1, logit_bytes=logit_bytes, reference_after=reference_after))
    # the log-softmax covers T − 1 positions (the last logit predicts nothing): within 1/T
    assert measured == pytest.approx(model, rel=1.01 / T)
