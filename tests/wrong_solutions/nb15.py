import torch

from tests.wrong_solutions import wrong


def _centred(r, G):
    g = r.view(-1, G)
    return g - g.mean(1, keepdim=True)


@wrong("15.1", "not divided by the group's std")
def adv_no_std(r, G):
    return _centred(r, G).view(-1)


@wrong("15.1", "population one")
def adv_population_std(r, G):
    g = r.view(-1, G)
    return (_centred(r, G) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


@wrong("15.1", "whole batch")
def adv_batch(r, G):
    return (r - r.mean()) / (r.std() + 1e-4)


@wrong("15.1", "add 1e-4 to the std")
def adv_no_eps(r, G):
    g = r.view(-1, G)
    return (_centred(r, G) / g.std(1, keepdim=True)).view(-1)


@wrong("15.1", "one advantage per completion")
def adv_2d(r, G):
    g = r.view(-1, G)
    return _centred(r, G) / (g.std(1, keepdim=True) + 1e-4)


@wrong("15.2", "max instead of min")
def clip_max(logp, old, adv, el, eh):
    ratio = torch.exp(logp - old)
    return -torch.max(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)


@wrong("15.2", "not 1 + ε_low")
def clip_symmetric(logp, old, adv, el, eh):
    ratio = torch.exp(logp - old)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + el) * adv)


@wrong("15.2", "the sign")
def clip_sign(logp, old, adv, el, eh):
    ratio = torch.exp(logp - old)
    return torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)


@wrong("15.2", "only the clipped term")
def clip_only(logp, old, adv, el, eh):
    return -torch.clamp(torch.exp(logp - old), 1 - el, 1 + eh) * adv


@wrong("15.2", "not the log-ratio")
def clip_log_ratio(logp, old, adv, el, eh):
    ratio = logp - old
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)


@wrong("15.2", "differentiable")
def clip_detached(logp, old, adv, el, eh):
    ratio = torch.exp(logp.detach() - old)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)
