"""Checks of notebook 11's exercises (the DPO loss zoo). Each check writes the paper's formula out
here, not dpo_lab's `dpo.loss`, so it shares no code with the solution it grades."""
import torch
import torch.nn.functional as F

from dpo_lab.exercises import Wrong, exercise, expect_close


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-12 + 4 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4))
    lc = torch.randint(1, 9, (n,), generator=g).double()
    lr = torch.randint(1, 9, (n,), generator=g).double()
    lr[0] = lc[0] + 3  # unequal lengths: sums and means disagree
    return pc, pr, rc, rr, lc, lr


def _per_pair(got, n):
    if not torch.is_tensor(got):
        raise Wrong(f"return a tensor of per-pair losses, got {type(got).__name__}")
    if got.dim() == 0:
        raise Wrong(f"return one loss per pair (shape [{n}]), not their mean: the caller averages")


@exercise("11.1", "the IPO loss, as TRL computes it")
def check_ipo_loss(fn):
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
    beta) -> per-pair IPO losses (Azar et al. 2023, Eq. 17) on per-token mean log-ratios (TRL)."""
    pc, pr, rc, rr, lc, lr = _pairs()
    for beta in (0.1, 0.5):
        mean_delta = (pc - rc) / lc - (pr - rr) / lr
        sum_delta = (pc - rc) - (pr - rr)
        want = (mean_delta - 1 / (2 * beta)) ** 2
        got = fn(pc, pr, rc, rr, lc, lr, beta)
        _per_pair(got, len(pc))
        close = lambda other: got.shape == other.shape and torch.allclose(got.double(), other, atol=1e-9)
        if close((sum_delta - 1 / (2 * beta)) ** 2):
            raise Wrong("Δ is built from sequence sums: TRL's IPO divides each log-ratio by its "
                        "completion's length (per-token means) before taking the difference")
        if close((mean_delta - 1 / beta) ** 2):
            raise Wrong("the target margin is 1/(2β) (the paper's 1/(2τ)), not 1/β")
        if close((mean_delta + 1 / (2 * beta)) ** 2):
            raise Wrong("the target is +1/(2β): the chosen answer's log-ratio must exceed the rejected one's")
        if close((beta * mean_delta - 1 / (2 * beta)) ** 2) or close((beta * mean_delta - 0.5) ** 2):
            raise Wrong("β does not scale Δ in IPO: it sets the target margin 1/(2β) that Δ regresses to")
        if close((mean_delta - 1 / (2 * beta)).abs()):
            raise Wrong("IPO squares the gap to the target; an absolute value gives a constant gradient")
        expect_close(got, want, f"the losses at β={beta}", atol=1e-9, rtol=1e-9)


@exercise("11.2", "the NCA loss, pairwise")
def check_nca_loss(fn):
    """fn(chosen_logratio, rejected_logratio, beta) -> per-pair NCA losses (Chen et al. 2024):
    −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), with r = β·(log πθ − log π_ref) of each answer."""
    g = torch.Generator().manual_seed(3)
    cw, cl = (8 * torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    for beta in (0.1, 0.5):
        rw, rl = beta * cw, beta * cl
        want = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
        got = fn(cw, cl, beta)
        _per_pair(got, len(cw))
        close = lambda other: got.shape == other.shape and torch.allclose(got.double(), other, atol=1e-9)
        if close(-F.logsigmoid(rw - rl)):
            raise Wrong("that is DPO's loss on the difference r_w − r_l: NCA scores each answer's own "
                        "reward, −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)")
        if close(-F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)):
            raise Wrong("β is missing: the rewards are r = β·(log πθ − log π_ref)")
        if close(-F.logsigmoid(rw) - F.logsigmoid(-rw) - F.logsigmoid(-rl)):
            raise Wrong("the two negative terms weigh ½ each, not 1")
        if close(-F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rl)) or close(-F.logsigmoid(rw) - F.logsigmoid(-rl)):
            raise Wrong("the chosen answer's own −½·log σ(−r_w) term is missing: NCA contrasts each "
                        "answer with the reference, the chosen one too (this is what bounds r_w)")
        expect_close(got, want, f"the losses at β={beta}", atol=1e-9, rtol=1e-9)
    # float32, as in training: log(sigmoid(−200)) is log(0) there
    far = fn(torch.tensor([-2000.0]), torch.tensor([0.0]), 0.1)
    if not torch.isfinite(far).all():
        raise Wrong("a chosen reward of −200 in float32 gives an infinite loss (the exact value is "
                    "about 200): log(sigmoid(x)) underflows, use F.logsigmoid")
