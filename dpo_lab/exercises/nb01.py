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


def _pairs(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-20 + 5 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4))
    return pc, pr, rc, rr


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@exercise("01.2", "the metrics TRL logs")
def check_dpo_metrics(fn):
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> dict of batch means under
    TRL's names, compared with DPOTrainer's definitions written out here (implicit rewards
    β·log π/π_ref, accuracy = strict share of pairs whose chosen reward is higher)."""
    pc, pr, rc, rr = _pairs()
    pr[:2], rr[:2] = pc[:2], rc[:2]  # two exact ties: TRL counts them as wrong (strict >)
    beta = 0.3
    got = fn(pc, pr, rc, rr, beta)
    if not isinstance(got, dict):
        raise Wrong(f"return a dict keyed by TRL's metric names, got {type(got).__name__}")
    missing = [k for k in METRIC_NAMES if k not in got]
    if missing:
        raise Wrong(f"missing key(s) {missing}: TRL logs {list(METRIC_NAMES)}")
    want_c, want_r = beta * (pc - rc), beta * (pr - rr)
    for k, v in got.items():
        if torch.is_tensor(v) and v.numel() > 1:
            raise Wrong(f"{k!r} has {v.numel()} values: log the batch mean, one number")
    val = {k: float(got[k]) for k in METRIC_NAMES}
    if abs(val["rewards/chosen"] - (pc - rc).mean().item()) < 1e-9:
        raise Wrong("β is missing: the implicit reward is β·(log π − log π_ref)")
    if abs(val["rewards/chosen"] - beta * pc.mean().item()) < 1e-9:
        raise Wrong("the reference is missing: the implicit reward is β·(log π − log π_ref), "
                    "not β·log π")
    expect_close(val["rewards/chosen"], want_c.mean(), "rewards/chosen", atol=1e-9)
    expect_close(val["rewards/rejected"], want_r.mean(), "rewards/rejected", atol=1e-9)
    expect_close(val["rewards/margins"], (want_c - want_r).mean(), "rewards/margins", atol=1e-9,
                 hints={-1: "the margin is chosen minus rejected"})
    acc = val["rewards/accuracies"]
    if abs(acc - (want_c >= want_r).double().mean().item()) < 1e-9:
        raise Wrong("ties count as correct: TRL's accuracy is the share of pairs with chosen reward "
                    "strictly above rejected (>), so a policy equal to the reference scores 0")
    if abs(acc - (want_c > want_r).sum().item()) < 1e-9:
        raise Wrong("rewards/accuracies is a count: take the mean (a share between 0 and 1)")
    expect_close(acc, (want_c > want_r).double().mean(), "rewards/accuracies", atol=1e-9)


@exercise("01.3", "summed completion log-probs")
def check_sequence_logps(fn):
    """fn(logits (B,T,V), input_ids (B,T), loss_mask (B,T)) -> (B,) sums of the completion tokens'
    log-probs. The reference is torch's cross-entropy (what Hugging Face models compute their LM
    loss with; TRL's selective_log_softmax gathers the same log_softmax), not dpo_lab's code."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 9, 11
    logits = 2 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)  # prompt of 2–3 tokens, completion, right padding
    for b, (start, end) in enumerate([(2, 9), (3, 6), (2, 5), (3, 8)]):
        mask[b, start:end] = 1

    def masked_sum(token_logp, m):
        return (token_logp * m).sum(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    token_logp = -nll.view(B, T - 1)
    want = masked_sum(token_logp, mask[:, 1:])

    got = fn(logits.clone(), ids.clone(), mask.clone())
    if not torch.is_tensor(got):
        raise Wrong(f"return a tensor of shape ({B},), got {type(got).__name__}")
    if got.dim() == 2:
        raise Wrong(f"returned shape {tuple(got.shape)}: sum over the tokens, one value per sequence ({B},)")
    if got.shape == want.shape:
        logp = logits.log_softmax(-1)
        unshifted = masked_sum(logp.gather(-1, ids[..., None])[..., 0], mask)
        wrong = [
            (unshifted, "off by one: logits[:, t] predict the *next* token, so score logits[:, :-1] "
                        "against input_ids[:, 1:]"),
            (masked_sum(token_logp, mask[:, :-1]), "the mask is one step off: after the shift, token "
                                                   "input_ids[:, t+1] is scored, so use loss_mask[:, 1:]"),
            (token_logp.sum(-1), "prompt and padding tokens are counted: multiply by the completion mask"),
            (want / mask[:, 1:].sum(-1), "you averaged over the completion tokens: DPO sums them "
                                         "(averaging divides β by the length, section 7)"),
            (masked_sum(logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], mask[:, 1:]),
             "you gathered raw logits: take log_softmax over the vocabulary first"),
            (masked_sum(logits.log_softmax(1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], mask[:, 1:]),
             "log_softmax ran over the sequence: normalise over the vocabulary (the last dim)"),
        ]
        for candidate, diagnosis in wrong:
            if torch.allclose(got.double(), candidate.double(), atol=1e-4) and not torch.allclose(
                    candidate.double(), want.double(), atol=1e-4):
                raise Wrong(diagnosis)
    expect_close(got, want, "the summed log-probs", atol=1e-4, rtol=1e-5,
                 hints={-1: "return log-probs (negative), not the negative log-likelihood"})
    # A confident model: logits of ±200 make most probabilities underflow to 0 in float32.
    sharp = fn(100 * logits, ids, mask)
    if torch.is_tensor(sharp) and not torch.isfinite(sharp).all():
        raise Wrong("logits of size ~200 give −inf: log(softmax(x)) underflows, use log_softmax")
