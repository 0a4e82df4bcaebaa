import torch
import torch.nn.functional as F

from tests.wrong_solutions import wrong


@wrong("01.1", "sign is flipped")
def dpo_loss_sign(pc, pr, rc, rr, beta):
    return F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


@wrong("01.1", "β is missing")
def dpo_loss_no_beta(pc, pr, rc, rr, beta):
    return -F.logsigmoid((pc - rc) - (pr - rr))


@wrong("01.1", "reference log-probs are missing")
def dpo_loss_no_reference(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * (pc - pr))


@wrong("01.1", "not their mean")
def dpo_loss_mean(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


@wrong("01.1", "use F.logsigmoid")
def dpo_loss_unstable(pc, pr, rc, rr, beta):
    return -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr))))


def _rewards(pc, pr, rc, rr, beta):
    return beta * (pc - rc), beta * (pr - rr)


def _metrics(c, r, acc):
    return {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
            "rewards/margins": (c - r).mean().item(), "rewards/accuracies": acc}


@wrong("01.2", "β is missing")
def metrics_no_beta(pc, pr, rc, rr, beta):
    c, r = pc - rc, pr - rr
    return _metrics(c, r, (c > r).float().mean().item())


@wrong("01.2", "the reference is missing")
def metrics_no_reference(pc, pr, rc, rr, beta):
    c, r = beta * pc, beta * pr
    return _metrics(c, r, (c > r).float().mean().item())


@wrong("01.2", "ties count as correct")
def metrics_ties_count(pc, pr, rc, rr, beta):
    c, r = _rewards(pc, pr, rc, rr, beta)
    return _metrics(c, r, (c >= r).float().mean().item())


@wrong("01.2", "is a count")
def metrics_accuracy_count(pc, pr, rc, rr, beta):
    c, r = _rewards(pc, pr, rc, rr, beta)
    return _metrics(c, r, (c > r).sum().item())


@wrong("01.2", "chosen minus rejected")
def metrics_margin_reversed(pc, pr, rc, rr, beta):
    c, r = _rewards(pc, pr, rc, rr, beta)
    m = _metrics(c, r, (c > r).float().mean().item())
    m["rewards/margins"] = (r - c).mean().item()
    return m


@wrong("01.2", "log the batch mean")
def metrics_per_pair(pc, pr, rc, rr, beta):
    c, r = _rewards(pc, pr, rc, rr, beta)
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
            "rewards/accuracies": (c > r).float()}


@wrong("01.2", "missing key")
def metrics_other_names(pc, pr, rc, rr, beta):
    c, r = _rewards(pc, pr, rc, rr, beta)
    return {"chosen_reward": c.mean().item(), "rejected_reward": r.mean().item()}


def _token_logps(logits, ids):
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@wrong("01.3", "off by one")
def logps_unshifted(logits, ids, mask):
    return (logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1)


@wrong("01.3", "mask is one step off")
def logps_mask_unshifted(logits, ids, mask):
    return (_token_logps(logits, ids) * mask[:, :-1]).sum(-1)


@wrong("01.3", "prompt and padding tokens are counted")
def logps_no_mask(logits, ids, mask):
    return _token_logps(logits, ids).sum(-1)


@wrong("01.3", "you averaged")
def logps_averaged(logits, ids, mask):
    m = mask[:, 1:]
    return (_token_logps(logits, ids) * m).sum(-1) / m.sum(-1)


@wrong("01.3", "raw logits")
def logps_raw_logits(logits, ids, mask):
    return (logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)


@wrong("01.3", "over the sequence")
def logps_softmax_over_time(logits, ids, mask):
    lp = logits.log_softmax(1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * mask[:, 1:]).sum(-1)


@wrong("01.3", "one value per sequence")
def logps_per_token(logits, ids, mask):
    return _token_logps(logits, ids) * mask[:, 1:]


@wrong("01.3", "not the negative log-likelihood")
def logps_nll(logits, ids, mask):
    return -(_token_logps(logits, ids) * mask[:, 1:]).sum(-1)


@wrong("01.3", "use log_softmax")
def logps_log_of_softmax(logits, ids, mask):
    p = logits[:, :-1].softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (p.log() * mask[:, 1:]).sum(-1)
