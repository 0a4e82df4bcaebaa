import torch
import torch.nn.functional as F

from tests.wrong_solutions import wrong


def _mean_delta(pc, pr, rc, rr, lc, lr):
    return (pc - rc) / lc - (pr - rr) / lr


@wrong("11.1", "built from sequence sums")
def ipo_sums(pc, pr, rc, rr, lc, lr, beta):
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


@wrong("11.1", "target margin is 1/(2β)")
def ipo_target_one_over_beta(pc, pr, rc, rr, lc, lr, beta):
    return (_mean_delta(pc, pr, rc, rr, lc, lr) - 1 / beta) ** 2


@wrong("11.1", "β does not scale Δ")
def ipo_beta_times_delta(pc, pr, rc, rr, lc, lr, beta):
    return (beta * _mean_delta(pc, pr, rc, rr, lc, lr) - 0.5) ** 2


@wrong("11.1", "not their mean")
def ipo_mean(pc, pr, rc, rr, lc, lr, beta):
    return ((_mean_delta(pc, pr, rc, rr, lc, lr) - 1 / (2 * beta)) ** 2).mean()


@wrong("11.1", "the target is +1/(2β)")
def ipo_target_sign(pc, pr, rc, rr, lc, lr, beta):
    return (_mean_delta(pc, pr, rc, rr, lc, lr) + 1 / (2 * beta)) ** 2


@wrong("11.1", "squares the gap")
def ipo_abs(pc, pr, rc, rr, lc, lr, beta):
    return (_mean_delta(pc, pr, rc, rr, lc, lr) - 1 / (2 * beta)).abs()


@wrong("11.2", "DPO's loss on the difference")
def nca_as_dpo(cw, cl, beta):
    return -F.logsigmoid(beta * (cw - cl))


@wrong("11.2", "β is missing")
def nca_no_beta(cw, cl, beta):
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


@wrong("11.2", "weigh ½ each")
def nca_no_halves(cw, cl, beta):
    rw, rl = beta * cw, beta * cl
    return -F.logsigmoid(rw) - F.logsigmoid(-rw) - F.logsigmoid(-rl)


@wrong("11.2", "−½·log σ(−r_w) term is missing")
def nca_no_chosen_anchor(cw, cl, beta):
    rw, rl = beta * cw, beta * cl
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rl)


@wrong("11.2", "use F.logsigmoid")
def nca_unstable(cw, cl, beta):
    rw, rl = beta * cw, beta * cl
    return (-torch.log(torch.sigmoid(rw)) - 0.5 * torch.log(torch.sigmoid(-rw))
            - 0.5 * torch.log(torch.sigmoid(-rl)))
