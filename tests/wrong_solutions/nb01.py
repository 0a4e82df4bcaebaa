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
