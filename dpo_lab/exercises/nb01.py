"""Checks of notebook 01's exercises (From RLHF to DPO)."""
import torch
import torch.nn.functional as F

from dpo_lab.exercises import Wrong, exercise, expect_close


@exercise("01.1", "the DPO loss")
def check_dpo_loss(fn):
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> per-pair losses,
    compared with the loss of the DPO paper written out here (not dpo_lab's, so the check shares no
    code with the solution it grades)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 + 5 * torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    for beta in (0.1, 0.5):  # not 1: there a missing β would go unseen
        want = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
        got = fn(pc, pr, rc, rr, beta)
        if not torch.is_tensor(got):
            raise Wrong(f"return a tensor of per-pair losses, got {type(got).__name__}")
        if got.dim() == 0:
            raise Wrong("return one loss per pair (shape [6]), not their mean: the caller averages")
        if torch.allclose(got, F.logsigmoid(beta * ((pc - rc) - (pr - rr))), atol=1e-9):
            raise Wrong("the sign is flipped: the loss is −log σ(βΔ), and it must fall as the margin grows")
        if torch.allclose(got, -F.logsigmoid((pc - rc) - (pr - rr)), atol=1e-9):
            raise Wrong("β is missing: the margin is β·[(π_c − ref_c) − (π_r − ref_r)]")
        if torch.allclose(got, -F.logsigmoid(beta * (pc - pr)), atol=1e-9):
            raise Wrong("the reference log-probs are missing: DPO compares log-ratios π/π_ref")
        expect_close(got, want, f"the losses at β={beta}", atol=1e-9, rtol=1e-9,
                     hints={-1: "the sign is flipped"})
    # float32, as in training: log(sigmoid(-200)) is log(0) there
    far = fn(torch.tensor([0.0]), torch.tensor([200.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    if not torch.isfinite(far).all():
        raise Wrong("a margin of −200 in float32 gives an infinite loss (the exact value is 200): "
                    "log(sigmoid(x)) underflows, use F.logsigmoid")
