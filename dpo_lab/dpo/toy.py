"""A toy alignment problem small enough to solve exactly: every step of RLHF → DPO checked.

A few prompts x, a handful of candidate responses y each, a known reward r(x, y) and a reference
policy π_ref(y|x). Policies are tables of log-probabilities, shape (prompts, responses), float64.

1. RLHF maximises  E_{y~π}[r(x,y)] − β·KL(π(·|x) ‖ π_ref(·|x));  its optimum is
   π*(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x).
2. Solved for r:  r(x,y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x).
3. Bradley–Terry:  P(y_w ≻ y_l) = σ(r(x,y_w) − r(x,y_l)); the β·log Z(x) terms cancel.
4. So fitting π by maximum likelihood of preferences (the DPO loss) recovers π*, and the implicit
   reward β·log π/π_ref recovers r up to a per-prompt constant.
"""
import torch
import torch.nn.functional as F


def make_toy(n_prompts: int = 3, n_responses: int = 5, seed: int = 0, reward_scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    reward = reward_scale * torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64), -1)
    return reward, ref_logp


def rlhf_objective(logp, ref_logp, reward, beta):
    """Per prompt: E_{y~π}[r] − β·KL(π ‖ π_ref)."""
    p = logp.exp()
    return (p * reward).sum(-1) - beta * (p * (logp - ref_logp)).sum(-1)


def rlhf_optimum(ref_logp, reward, beta):
    """log π* = log π_ref + r/β − log Z, with log Z = logsumexp(log π_ref + r/β)."""
    return torch.log_softmax(ref_logp + reward / beta, dim=-1)


def log_partition(ref_logp, reward, beta):
    return torch.logsumexp(ref_logp + reward / beta, dim=-1)


def implicit_reward(logp, ref_logp, beta):
    return beta * (logp - ref_logp)


def bradley_terry(reward):
    """P[x, i, j] = probability that response i is preferred to response j."""
    return torch.sigmoid(reward[:, :, None] - reward[:, None, :])


def remove_prompt_constant(values):
    return values - values.mean(-1, keepdim=True)


def recovery_error(implicit, reward):
    """max |implicit − r| once each prompt's constant offset (β·log Z) is removed."""
    return (remove_prompt_constant(implicit) - remove_prompt_constant(reward)).abs().max().item()


def sample_preferences(reward, pairs_per_prompt: int, seed: int = 0):
    """Counts C[x, i, j] of 'i preferred to j' from pairs drawn uniformly and labelled by Bradley–Terry."""
    g = torch.Generator().manual_seed(seed)
    n_prompts, k = reward.shape
    counts = torch.zeros(n_prompts, k, k, dtype=torch.float64)
    p = bradley_terry(reward)
    for x in range(n_prompts):
        i = torch.randint(k, (pairs_per_prompt,), generator=g)
        j = (i + torch.randint(1, k, (pairs_per_prompt,), generator=g)) % k  # j != i
        i_wins = torch.rand(pairs_per_prompt, generator=g, dtype=torch.float64) < p[x, i, j]
        w = torch.where(i_wins, i, j)
        l = torch.where(i_wins, j, i)
        counts[x].index_put_((w, l), torch.ones(pairs_per_prompt, dtype=torch.float64), accumulate=True)
    return counts


def dpo_objective(logits, ref_logp, pair_weights, beta):
    """Σ_x Σ_{w,l} W[x,w,l] · −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)])."""
    h = implicit_reward(torch.log_softmax(logits, -1), ref_logp, 1.0)
    delta = h[:, :, None] - h[:, None, :]
    return -(pair_weights * F.logsigmoid(beta * delta)).sum()


def solve_dpo(ref_logp, pair_weights, beta, steps: int = 200):
    """The DPO optimum over tabular policies (L-BFGS in float64), as log-probabilities."""
    logits = ref_logp.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = dpo_objective(logits, ref_logp, pair_weights, beta)
        loss.backward()
        return loss
    opt.step(closure)
    return torch.log_softmax(logits.detach(), -1)


def kl(logp, ref_logp):
    return (logp.exp() * (logp - ref_logp)).sum(-1)
