import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lab import task
from dpo_lab.dpo.loss import dpo_loss, dpo_metrics, gradient_weight, sequence_logps
from dpo_lab.dpo.trl_check import VARIANTS, compare_with_trl
from dpo_lab.models import build_tiny_model, build_tokenizer


def test_worked_example():
    # policy chosen −5, rejected −7; reference −6 and −6; β = 1
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    losses, rc, rr = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=1.0)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))  # −log σ(2) ≈ 0.1269
    assert (rc.item(), rr.item()) == (1.0, -1.0)
    assert gradient_weight(torch.tensor(2.0), 1.0).item() == pytest.approx(1 / (1 + math.e ** 2))


def test_policy_equal_to_reference_gives_ln2():
    x = torch.randn(8)
    losses, _, _ = dpo_loss(x, x + 1, x, x + 1, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))


def test_sequence_logps_sums_completion_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    ref = F.log_softmax(logits, -1)
    expect0 = sum(ref[0, t - 1, ids[0, t]] for t in (2, 3, 4))
    expect1 = ref[1, 2, ids[1, 3]]
    out = sequence_logps(logits, ids, mask)
    assert torch.allclose(out, torch.stack([expect0, expect1]))
    assert torch.allclose(sequence_logps(logits, ids, mask, average=True), torch.stack([expect0 / 3, expect1]))


def test_metrics_names_and_values():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    losses, cr, rj = dpo_loss(c, r, torch.zeros(2), torch.zeros(2), beta=0.5)
    m = dpo_metrics(losses, cr, rj, c, r)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx(0.5 * 0.5 * (2 - 1))
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected"}


def test_bad_arguments_are_named():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


def test_every_variant_equals_trl():
    rows = task.read_jsonl(task.TASK_DIR / "test.jsonl")[:6]
    diffs = compare_with_trl(build_tiny_model(seed=0), build_tiny_model(seed=1), build_tokenizer(), rows,
                             beta=0.5)
    assert set(diffs) == set(VARIANTS)
    for name, d in diffs.items():
        assert d["loss"] <= 1e-6, (name, d)
        assert d["metrics"] <= 1e-5, (name, d)  # log-probs near −14: fp32 spacing is ~1e-6 there
