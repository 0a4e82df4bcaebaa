"""The DPO loss zoo (every loss type of TRL 1.16), and the metrics TRL logs.

Conventions (those of the DPO paper, its reference code and TRL):
- a sequence's log-prob is the SUM of its completion tokens' log-probs (prompt and padding masked);
  `ld_alpha` switches to LD-DPO's length-desensitised sum (`dpo_lab.dpo.ld`);
- Δ = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x)), or its f-DPO form
  (`dpo_lab.dpo.fdiv`);
- the implicit reward of a completion is β·(log πθ − log π_ref).
Each loss below is one short function of per-pair tensors; `dpo_loss` picks and weighs them.
"""
import torch
import torch.nn.functional as F

from dpo_lab.dpo.fdiv import check_f_divergence, f_divergence_scores
from dpo_lab.dpo.ld import ld_sequence_logps

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the losses that read ε


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False, ld_alpha: float | None = None) -> torch.Tensor:
    """Log-prob of each sequence's completion: logits[:, t] predicts input_ids[:, t + 1].

    loss_mask (B, T) is 1 on completion tokens. Returns (B,) sums, or per-token means if `average`
    (which, as the lesson shows, rescales the effective β by the completion length), or with
    `ld_alpha` the LD-DPO sums of rows laid out [chosen; rejected].
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:].to(token_logp.dtype)
    if ld_alpha is not None:
        if average:
            raise ValueError("sequence_logps: pass average=True or ld_alpha, not both")
        return ld_sequence_logps(token_logp, mask, ld_alpha)
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# --- the losses: per pair, from Δ (delta) or from each completion's log-ratio ---------------------

def sigmoid_loss(delta, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): −log σ(βΔ).
    ε > 0: conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"),
    −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ). TRL 1.16's `sigmoid` ignores ε (its `aot` at one pair is this)."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def hinge_loss(delta, beta):
    """SLiC (Zhao et al. 2023, arXiv:2305.10425): relu(1 − βΔ); 1/β is the margin."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta, beta):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17): (Δ − 1/(2β))², β being the paper's τ.
    TRL (and `dpo_loss` given lengths) builds Δ from per-token MEAN log-ratios."""
    return (delta - 1 / (2 * beta)) ** 2


def exo_pair_loss(delta, beta, label_smoothing):
    """EXO, pairwise (Ji et al. 2024, arXiv:2402.00856, Eq. 16): KL(q ‖ p) with q = σ(±βΔ) the policy's
    softmax over the pair and p = (1−ε, ε) the smoothed labels; needs ε > 0."""
    q_w, q_l = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
    eps = torch.as_tensor(label_smoothing, dtype=delta.dtype, device=delta.device)
    return (q_w * (F.logsigmoid(beta * delta) - torch.log1p(-eps))
            + q_l * (F.logsigmoid(-beta * delta) - torch.log(eps)))


def nca_pair_loss(chosen_reward, rejected_reward):
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l),
    on the absolute rewards r = β·log-ratio, not their difference."""
    return (-F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward)
            - 0.5 * F.logsigmoid(-rejected_reward))


def robust_loss(delta, beta, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409):
    [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε), unbiased when labels flip with probability ε."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def bco_pair_loss(chosen_reward, rejected_reward):
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656): a binary classifier with logit r = β·log-ratio,
    chosen → 1, rejected → 0: −log σ(r_w) − log σ(−r_l). The paper shifts r by a running mean δ of
    the rewards; TRL 1.16's `bco_pair` has no such state (no RunningMoments), and neither has this."""
    return -F.logsigmoid(chosen_reward) - F.logsigmoid(-rejected_reward)


def sppo_hard_loss(chosen_logratio, rejected_logratio, beta):
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner,
    0 for the loser): (log-ratio_w − 1/(2β))² + (log-ratio_l + 1/(2β))²."""
    return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2


def aot_loss(policy_margin, ref_margin, beta, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): the sigmoid loss on sorted quantiles,
    Δ_(i) = sort(log πθ(y_w) − log πθ(y_l))_i − sort(log π_ref(y_w) − log π_ref(y_l))_i, so the
    policy's margins stochastically dominate the reference's across the batch."""
    delta = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    return sigmoid_loss(delta, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratio, rejected_logratio, beta, label_smoothing=0.0):
    """AOT, unpaired (Melnyk et al. 2024): chosen log-ratios sorted against rejected ones sorted."""
    delta = torch.sort(chosen_logratio, dim=0).values - torch.sort(rejected_logratio, dim=0).values
    return sigmoid_loss(delta, beta, label_smoothing)


def apo_zero_loss(chosen_reward, rejected_reward):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): (1 − σ(r_w)) + σ(r_l), raising
    the chosen likelihood and lowering the rejected one (chosen outputs better than the model's)."""
    return 1 - torch.sigmoid(chosen_reward) + torch.sigmoid(rejected_reward)


def apo_down_loss(chosen_reward, rejected_reward):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(r_w) + (1 − σ(r_w − r_l)), lowering both, the
    rejected more (chosen outputs worse than the model's)."""
    return torch.sigmoid(chosen_reward) + 1 - torch.sigmoid(chosen_reward - rejected_reward)


def discopop_loss(delta, beta, tau=0.05):
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5):
    with z = βΔ and m = σ(z/τ), (1 − m)·(−log σ(z)) + m·exp(−z)."""
    z = beta * delta
    m = torch.sigmoid(z / tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def sft_loss(chosen_logps, chosen_lengths):
    """SFT term (the NLL of MPO, Wang et al. 2024, arXiv:2411.10442): −(Σ chosen token log-probs) /
    (number of chosen tokens) over the batch, one scalar given to every pair (TRL's token mean)."""
    nll = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    return nll.expand(chosen_logps.shape[0])


def sigmoid_norm_loss(delta, beta):
    """Length-normalised DPO: −log σ(βΔ) with Δ from per-token MEAN log-ratios (TRL's docs give no
    paper; it is the length-normalised DPO of Tülu 3, Lambert et al. 2024, arXiv:2411.15124)."""
    return -F.logsigmoid(beta * delta)


# --- dispatch -------------------------------------------------------------------------------------

def _check_shapes(**tensors) -> None:
    """Every argument must have the first one's shape: broadcasting would silently pair the
    wrong completions."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {first} has {tuple(ref.shape)}: "
                             f"dpo_loss needs one value per pair in each")


def loss_types_and_weights(loss_type, loss_weights=None) -> tuple[tuple, tuple]:
    """One name or a list -> (types, weights); weights default to 1 each (TRL's default)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError(f"loss_type is empty; valid: {', '.join(LOSS_TYPES)}")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; valid: {', '.join(LOSS_TYPES)}")
    weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(types)} loss types {list(types)}")
    return types, weights


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             loss_type="sigmoid", label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None,
             *, loss_weights=None, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             discopop_tau: float = 0.05, sft_chosen_logps=None):
    """Per-pair losses Σ_k w_k·loss_k (their mean is TRL's loss) and the implicit rewards of chosen
    and rejected completions.

    loss_type: one of LOSS_TYPES or a list of them, weighed by `loss_weights` (MPO is
    ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0]). label_smoothing ε is read by the SMOOTHED
    losses only. chosen_lengths / rejected_lengths (completion token counts) make `ipo` and
    `sigmoid_norm` use per-token means as TRL does (`ipo` without them: sequence sums, as in the IPO
    paper); `sigmoid_norm` and `sft` need them. sft_chosen_logps: the chosen sums that `sft`
    averages, if the others are LD-DPO sums (TRL's SFT term ignores ld_alpha); default policy_chosen.
    """
    types, weights = loss_types_and_weights(loss_type, loss_weights)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0:  # log ε would be −inf
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper uses 1e-3), got 0")
    if not float(beta) > 0:  # also catches NaN; β ≤ 0 flips or erases the preference
        raise ValueError(f"beta must be > 0, got {beta}")
    if "discopop" in types and not float(discopop_tau) > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, types)
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                  ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if (chosen_lengths is None) != (rejected_lengths is None):
        given = "chosen_lengths" if rejected_lengths is None else "rejected_lengths"
        raise ValueError(f"got {given} alone: pass both chosen_lengths and rejected_lengths "
                         f"(per-token means, as TRL's IPO) or neither (sequence sums)")
    if chosen_lengths is not None:
        _check_shapes(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths,
                      rejected_lengths=rejected_lengths)
    elif need := [t for t in types if t in ("sigmoid_norm", "sft")]:
        raise ValueError(f"loss_type {need} needs chosen_lengths and rejected_lengths (completion token counts)")

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    chosen_score = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_score = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_score - rejected_score
    if chosen_lengths is not None:  # per-token means, for ipo and sigmoid_norm
        delta_mean = chosen_score / chosen_lengths.clamp(min=1) - rejected_score / rejected_lengths.clamp(min=1)
    else:
        delta_mean = delta
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    eps = label_smoothing
    pick = {
        "sigmoid": lambda: sigmoid_loss(delta, beta, eps),
        "hinge": lambda: hinge_loss(delta, beta),
        "ipo": lambda: ipo_loss(delta_mean, beta),
        "exo_pair": lambda: exo_pair_loss(delta, beta, eps),
        "nca_pair": lambda: nca_pair_loss(r_w, r_l),
        "robust": lambda: robust_loss(delta, beta, eps),
        "bco_pair": lambda: bco_pair_loss(r_w, r_l),
        "sppo_hard": lambda: sppo_hard_loss(chosen_logratios, rejected_logratios, beta),
        "aot": lambda: aot_loss(policy_chosen - policy_rejected, ref_chosen - ref_rejected, beta, eps),
        "aot_unpaired": lambda: aot_unpaired_loss(chosen_logratios, rejected_logratios, beta, eps),
        "apo_zero": lambda: apo_zero_loss(r_w, r_l),
        "apo_down": lambda: apo_down_loss(r_w, r_l),
        "discopop": lambda: discopop_loss(delta, beta, discopop_tau),
        "sft": lambda: sft_loss(policy_chosen if sft_chosen_logps is None else sft_chosen_logps, chosen_lengths),
        "sigmoid_norm": lambda: sigmoid_norm_loss(delta_mean, beta),
    }
    losses = sum(w * pick[t]() for t, w in zip(types, weights))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def completion_logit_sums(logits: torch.Tensor, loss_mask: torch.Tensor):
    """Per sequence: the sum over completion tokens of each token's mean-over-vocabulary logit, and
    the number of those tokens (same shift as `sequence_logps`). TRL's `logits/chosen` is the
    batch's token-weighted mean, sum of sums / sum of counts, so ranks and micro-batches add up."""
    mean_logit = logits[:, :-1].detach().float().mean(-1)
    mask = loss_mask[:, 1:].to(mean_logit.dtype)
    return (mean_logit * mask).sum(-1), mask.sum(-1)


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected,
                logit_sums=None) -> dict:
    """Batch means under TRL's metric names, so TRL users can read our logs.

    `rewards/accuracies` counts margins strictly above 0 (TRL's `>`): a tie, e.g. every pair at
    step 1 when the policy equals the reference, counts as wrong, so step 1 logs 0.0, not 0.5.
    `logit_sums`: `completion_logit_sums` of the [chosen; rejected] rows, for `logits/*`.
    """
    margins = chosen_rewards - rejected_rewards
    out = {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    if logit_sums is not None:
        (sum_c, sum_r), (n_c, n_r) = (t.chunk(2) for t in logit_sums)
        out["logits/chosen"] = (sum_c.sum() / n_c.sum().clamp(min=1)).item()
        out["logits/rejected"] = (sum_r.sum() / n_r.sum().clamp(min=1)).item()
    return out


def gradient_weight(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """σ(−βΔ) = σ(r̂_l − r̂_w): how hard the sigmoid loss pushes a pair; large when it is ranked wrongly."""
    return torch.sigmoid(-beta * delta)
