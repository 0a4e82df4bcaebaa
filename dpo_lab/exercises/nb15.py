"""Checks of notebook 15's exercises (GRPO from scratch), graded against `dpo_lab.rl.grpo`, which
is itself tested against TRL's GRPOTrainer (tests/test_grpo.py)."""
import torch

from dpo_lab.exercises import Wrong, exercise, expect_close
from dpo_lab.rl import grpo


def _rewards(seed=0, n=5, G=4):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, (n * G,), generator=g).float()
    r[:G] = 1.0                      # a group all right: std 0
    r[G:2 * G] = 0.0
    r[G] = 1.0                       # one right in a group
    r[-G:] = torch.rand(G, generator=g)  # graded rewards, not only 0/1
    return r


@exercise("15.1", "group-normalised advantages")
def check_group_advantages(fn):
    """fn(rewards (N·G,), G) -> (N·G,) advantages (r − mean of the group) / (std of the group + 1e-4),
    the std unbiased as torch.std's default (GRPO; TRL adds 1e-4)."""
    for G in (4, 2):
        r = _rewards(G=G)
        want = grpo.group_advantages(r, G, "group")
        got = fn(r.clone(), G)
        if not torch.is_tensor(got):
            raise Wrong(f"return a tensor, got {type(got).__name__}")
        if got.shape != want.shape:
            raise Wrong(f"return one advantage per completion, shape {tuple(want.shape)}, not {tuple(got.shape)}")
        if not torch.isfinite(got).all():
            raise Wrong("a group whose rewards are all equal has std 0: add 1e-4 to the std (its advantages are 0)")
        close = lambda other: torch.allclose(got, other, atol=1e-5)
        groups = r.view(-1, G)
        centred = (groups - groups.mean(1, keepdim=True)).view(-1)
        if close(centred):
            raise Wrong("the advantages are centred but not divided by the group's std (that is Dr. GRPO's "
                        "choice, not GRPO's)")
        if close(centred / (groups.std(1, unbiased=False).repeat_interleave(G) + 1e-4)):
            raise Wrong("the std is the population one (unbiased=False): GRPO and TRL use torch.std's "
                        "default, the unbiased one")
        if close(grpo.group_advantages(r, G, "batch")) or close((r - r.mean()) / (r.std() + 1e-4)):
            raise Wrong("normalised over the whole batch: each prompt's group has its own mean and std")
        if close(-want):
            raise Wrong("the sign is flipped: a completion above its group's mean gets a positive advantage")
        expect_close(got, want, f"the advantages at G={G}", atol=1e-5, rtol=1e-5)


@exercise("15.2", "the clipped GRPO objective for one token")
def check_clipped_token_loss(fn):
    """fn(logp, old_logp, advantage, eps_low, eps_high) -> per-token loss (same shape), PPO's clipped
    surrogate with DAPO's asymmetric clip: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = exp(logp − old_logp)."""
    g = torch.Generator().manual_seed(1)
    old = -3 * torch.rand(64, generator=g)
    logp = old + torch.linspace(-0.6, 0.6, 64)  # ratios from 0.55 to 1.8: both clips bite
    adv = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0) * (0.5 + torch.rand(64, generator=g))
    el, eh = 0.2, 0.28
    mask = torch.ones(1, 64)
    kw = dict(epsilon_low=el, epsilon_high=eh, loss_type="bnpo")
    want = torch.stack([grpo.grpo_loss(logp[i:i + 1, None], old[i:i + 1, None], None, adv[i:i + 1],
                                       mask[:, :1], **kw)[0] for i in range(64)])
    x = logp.clone().requires_grad_()
    got = fn(x, old, adv, el, eh)
    if not torch.is_tensor(got) or got.shape != want.shape:
        raise Wrong(f"return one loss per token, shape {tuple(want.shape)}")
    ratio = torch.exp(logp - old)
    close = lambda other: torch.allclose(got.detach(), other, atol=1e-6)
    if close(-torch.max(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)):
        raise Wrong("max instead of min: the pessimistic (smaller) surrogate is the one kept")
    if close(-torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + el) * adv)):
        raise Wrong("the upper clip is 1 + ε_high (DAPO's clip-higher), not 1 + ε_low")
    if close(torch.min(ratio * adv, torch.clamp(ratio, 1 - el, 1 + eh) * adv)):
        raise Wrong("the sign: the objective is maximised, so the loss is its negative")
    if close(-torch.clamp(ratio, 1 - el, 1 + eh) * adv):
        raise Wrong("only the clipped term: PPO takes the min of the clipped and the unclipped term")
    if close(-torch.min((logp - old) * adv, torch.clamp(logp - old, 1 - el, 1 + eh) * adv)):
        raise Wrong("the ratio is exp(logp − old_logp), not the log-ratio")
    expect_close(got.detach(), want, "the per-token losses", atol=1e-6, rtol=1e-6)
    if not got.requires_grad:
        raise Wrong("the loss must be differentiable in logp (do not detach it or leave torch)")
    got.sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise Wrong("the loss must be differentiable in logp (do not detach it or leave torch)")
    w = x.grad
    x2 = logp.clone().requires_grad_()
    torch.stack([grpo.grpo_loss(x2[i:i + 1, None], old[i:i + 1, None], None, adv[i:i + 1], mask[:, :1], **kw)[0]
                 for i in range(64)]).sum().backward()
    expect_close(w, x2.grad, "the gradient with respect to logp (zero where the clip bites)", atol=1e-6, rtol=1e-6)
