"""Every DPO loss variant against its formula written out in float64, with lengths that differ
and a label smoothing that is not zero, so that each term and each denominator shows."""
import math

import pytest
import torch

from dpo_lab.dpo.loss import dpo_loss, sequence_logps

# pairs: log-probs of policy and reference, chosen and rejected; lengths differ within each pair
PC, PR = [-5.0, -9.0, -2.0], [-7.0, -4.0, -3.0]
RC, RR = [-6.0, -8.5, -2.5], [-6.5, -5.0, -2.0]
LC, LR = [2, 5, 1], [4, 1, 3]
BETA, EPS = 0.7, 0.2


def logsig(x):
    return -math.log1p(math.exp(-x))


def expected(kind, i):
    dc, dr = PC[i] - RC[i], PR[i] - RR[i]
    z = BETA * (dc - dr)
    if kind == "sigmoid":
        return -(1 - EPS) * logsig(z) - EPS * logsig(-z)
    if kind == "robust":
        return (-(1 - EPS) * logsig(z) + EPS * logsig(-z)) / (1 - 2 * EPS)
    if kind == "hinge":
        return max(0.0, 1 - z)
    if kind == "ipo":
        return (dc / LC[i] - dr / LR[i] - 1 / (2 * BETA)) ** 2
    return (dc - dr - 1 / (2 * BETA)) ** 2  # ipo without lengths: sequence sums


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo", "ipo_sums"])
def test_each_variant_equals_its_formula(kind):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    lengths = dict(chosen_lengths=t(LC), rejected_lengths=t(LR)) if kind == "ipo" else {}
    eps = EPS if kind in ("sigmoid", "robust") else 0.0
    losses, cr, rr = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, label_smoothing=eps,
                              loss_type=kind.replace("_sums", ""), **lengths)
    want = [expected(kind, i) for i in range(3)]
    torch.testing.assert_close(losses, t(want), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, BETA * (t(PC) - t(RC)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rr, BETA * (t(PR) - t(RR)), rtol=1e-12, atol=1e-12)


def test_average_of_a_completion_without_tokens_is_zero_not_nan():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(5, (2, 4))
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])  # the second row has no completion
    out = sequence_logps(logits, ids, mask, average=True)
    assert torch.isfinite(out).all() and out[1] == 0
