"""GRPO training on the addition task, from the SFT model, on 1 or more ranks.

One step (Shao et al. 2024, Algorithm 1 with μ = 1 update per batch, so π_old = π_θ at the update):
  1. pick `prompts_per_step` prompts (seeded by step); rank r samples G completions for its share;
  2. rewards are all-gathered, so advantages are normalised over whole groups (and the whole batch
     for scale="batch") on every rank alike;
  3. each group of G rows is one micro-batch, its loss scaled to its share of the *global* loss;
     gradients are summed over micro-batches and all-reduced, then one AdamW step. Statistics of the
     whole global batch that a group's loss needs (its active tokens; with top_entropy_quantile < 1
     the entropy threshold and the kept tokens) are all-reduced before any group's loss;
  4. success, mean reward, KL to the reference, completion length and entropy are all-reduced, so
     every rank logs the same numbers and any stop decision is taken by all ranks together.

Full fine-tuning rather than LoRA: the tiny model has about a million parameters, so a frozen copy
as the reference costs nothing, the ranks need no adapter library, and "same parameters on 1 and 2
ranks" compares every weight. A group's rows are decoded and scored as one batch on whichever rank
owns it, so the samples and forward passes are bit-identical across layouts; only the order of
the gradient sum differs.
"""
import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from dpo_lab.models import task_success
from dpo_lab.rl import grpo
from dpo_lab.rl.rollout import CHECKERS, exact, rollout, token_logps_and_entropy


@dataclass
class GRPOSettings:
    steps: int = 20
    prompts_per_step: int = 8       # global: split evenly over ranks
    G: int = 8                      # completions per prompt
    lr: float = 1e-4                # greedy test success 0.66 -> 0.94 in 60 steps (8 prompts × G=8)
    beta: float = 0.04              # KL to the reference (k3); 0 = no reference
    loss_type: str = "dapo"         # any of grpo.TRL_LOSS_TYPES, see grpo.py
    importance_sampling_level: str = "token"  # "sequence": GSPO (loss_type in grpo.SEQUENCE_OK)
    entropy_coef: float = 0.0       # entropy bonus (the start value with use_adaptive_entropy)
    top_entropy_quantile: float = 1.0  # ρ < 1: the policy term keeps the top-ρ entropy tokens only
    use_adaptive_entropy: bool = False  # Skywork-OR1's controller, grpo.AdaptiveEntropy
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    scale: str = "group"            # group / batch / none, see grpo.group_advantages
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28      # DAPO's clip-higher
    temperature: float = 1.0
    max_new_tokens: int = 6
    mask_truncated_completions: bool = False  # DAPO: completions cut at max_new_tokens add no token
    checker: str = "exact"          # the reward; "contains"/"prefix" are the loose ones
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0             # greedy success on `eval_rows` every k steps (0: never)
    stop_at_success: float | None = None  # stop once that greedy success is reached


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _gather(x: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _gather_ragged(x: torch.Tensor) -> torch.Tensor:
    """All ranks' 1-D tensors of different lengths, concatenated in rank order."""
    if not dist.is_initialized():
        return x
    counts = _gather(torch.tensor([x.numel()])).tolist()
    padded = torch.full((max(counts),), math.nan, dtype=x.dtype)
    padded[:x.numel()] = x
    return torch.cat([row[:n] for row, n in zip(_gather(padded).view(len(counts), -1), counts)])


def step_prompts(rows, s: GRPOSettings, step: int) -> list[str]:
    """The step's global batch of prompts, the same on every rank."""
    g = torch.Generator().manual_seed(s.seed * 7919 + step)
    return [rows[i]["prompt"] for i in torch.randperm(len(rows), generator=g)[:s.prompts_per_step].tolist()]


def group_loss(logps, ref_logps, adv, mask, s: GRPOSettings, n_seqs: int, n_tokens: float, entropies=None,
               entropy_threshold=None, n_entropy_tokens=None, entropy_coef=None):
    """One group's share of the global loss, so that the shares add up to `grpo_loss` on the whole
    batch of `n_seqs` sequences and `n_tokens` active tokens:
    - per-sequence means (grpo, sapo), sums (luspo) and dr_grpo's constant: × rows / n_seqs;
    - token sums over the batch (bnpo, dapo, cispo, vespo): divided by the global `n_tokens` (bnpo and
      dapo coincide when the whole batch makes one update);
    - the entropy bonus, a mean over the batch's kept tokens: its sum over `n_entropy_tokens`, unscaled;
    - top_entropy_quantile < 1: the batch's `entropy_threshold` (grpo.entropy_threshold over every group
      on every rank), since a group's own quantile is not the batch's.
    `entropy_coef` (default s.entropy_coef): the adaptive controller's coefficient for this step."""
    coef = s.entropy_coef if entropy_coef is None else entropy_coef
    if s.top_entropy_quantile < 1.0 and entropy_threshold is None:
        raise ValueError(f"top_entropy_quantile={s.top_entropy_quantile}: group_loss needs the batch's "
                         "entropy_threshold")
    kw = dict(epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high, beta=s.beta, entropies=entropies,
              importance_sampling_level=s.importance_sampling_level, top_entropy_quantile=s.top_entropy_quantile,
              entropy_threshold_value=entropy_threshold)
    old = logps.detach()  # μ = 1: sampled by the policy being updated
    rows = logps.shape[0]
    if s.loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        loss, m = grpo.grpo_loss(logps, old, ref_logps, adv, mask, num_active_tokens=n_tokens,
                                 loss_type="dapo" if s.loss_type == "bnpo" else s.loss_type, **kw)
    else:
        loss, m = grpo.grpo_loss(logps, old, ref_logps, adv, mask, loss_type=s.loss_type,
                                 max_completion_length=s.max_new_tokens, **kw)
        loss = loss * rows / n_seqs
    if coef != 0.0:
        keep = mask if s.top_entropy_quantile == 1.0 else grpo.high_entropy_mask(entropies, mask, entropy_threshold)
        loss = loss - coef * grpo.entropy_bonus(entropies, keep, n_entropy_tokens)
    return loss, m


def greedy_success(model, tok, rows) -> float:
    """The task's success of greedy answers on `rows`, each rank scoring its share (all ranks get the
    same number, so a decision taken on it is taken by all)."""
    rank, world = _world()
    mine = rows[rank::world]
    hits = task_success(model, tok, mine) * len(mine) if mine else 0.0
    return _sum(torch.tensor([hits], dtype=torch.float64)).item() / len(rows)


def train_grpo(rows, s: GRPOSettings, model=None, progress: bool = True, eval_rows=None) -> dict:
    """Train (a copy of) `model` (default: the SFT model) with GRPO on `rows` ({"prompt": ...}).
    Runs on every rank of an initialised process group (or alone). Returns {"history": per-step
    metrics, "settings", "state": the final parameters}; with `eval_rows` and `s.eval_every`, the
    history also has "test_success" (greedy) before training and every `eval_every` steps."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from dpo_lab.models import build_tokenizer, sft_model_dir
    if s.eval_every and not eval_rows:
        raise ValueError(f"eval_every={s.eval_every} needs eval_rows")
    if s.checker not in CHECKERS:
        raise ValueError(f"checker={s.checker!r}: expected one of {sorted(CHECKERS)}")
    if s.loss_type not in grpo.TRL_LOSS_TYPES:
        raise ValueError(f"loss_type={s.loss_type!r}: expected one of {grpo.TRL_LOSS_TYPES}")
    if s.importance_sampling_level == "sequence" and s.loss_type not in grpo.SEQUENCE_OK:
        raise ValueError(f"importance_sampling_level='sequence' needs loss_type in {grpo.SEQUENCE_OK}, "
                         f"not {s.loss_type!r}")
    if not 0.0 <= s.top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={s.top_entropy_quantile}: expected a value in [0, 1]")
    rank, world = _world()
    if s.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={s.prompts_per_step} does not split over {world} ranks")
    tok = build_tokenizer()
    policy = copy.deepcopy(model) if model is not None else AutoModelForCausalLM.from_pretrained(
        sft_model_dir(progress=False))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
    checker, share = CHECKERS[s.checker], s.prompts_per_step // world
    bonus = s.entropy_coef != 0.0 or s.use_adaptive_entropy  # as TRL: adaptive may start at 0
    ctrl = grpo.AdaptiveEntropy(s.entropy_coef, s.entropy_coef_min, s.entropy_coef_max, s.entropy_coef_delta,
                                s.entropy_target) if s.use_adaptive_entropy else None
    history = []
    if s.eval_every:
        history.append({"step": -1, "test_success": greedy_success(policy, tok, eval_rows)})
        policy.train()
    bar = tqdm(range(s.steps), desc=f"GRPO ({world} rank{'s' * (world > 1)})", disable=not progress or rank > 0,
               mininterval=2)
    for step in bar:
        prompts = step_prompts(rows, s, step)[rank * share:(rank + 1) * share]
        ro = rollout(policy, tok, prompts, s.G, seed=s.seed, step=step, first_index=rank * share,
                     max_new_tokens=s.max_new_tokens, temperature=s.temperature, checker=checker,
                     mask_truncated=s.mask_truncated_completions)
        rewards = _gather(ro.rewards)  # whole groups (and the whole batch) on every rank
        adv = grpo.group_advantages(rewards, s.G, s.scale)[rank * share * s.G:(rank + 1) * share * s.G]
        mask = ro.completion_mask.float()
        n_tokens = _sum(mask.sum().reshape(1)).item()
        n_seqs = s.prompts_per_step * s.G
        # every group's forward first (graphs kept: the model is tiny): the entropy threshold and the kept
        # tokens are the whole global batch's, needed before any group's loss
        groups = []
        for g in range(share):
            rs = slice(g * s.G, (g + 1) * s.G)
            pid, cid = ro.prompt_ids[rs], ro.completion_ids[rs]
            logps, ent = token_logps_and_entropy(policy, pid, cid, ro.completion_mask[rs])
            with torch.no_grad():
                ref_logps = token_logps_and_entropy(ref, pid, cid, ro.completion_mask[rs])[0]
            groups.append((rs, logps, ent, ref_logps))
        thr, keeps = None, [mask[rs] for rs, *_ in groups]
        if s.top_entropy_quantile < 1.0:
            active = _gather_ragged(torch.cat([e.detach()[mask[rs] > 0] for rs, _, e, _ in groups]).reshape(-1))
            thr = grpo.entropy_threshold(active.view(1, -1), torch.ones(1, active.numel()), s.top_entropy_quantile)
            keeps = [grpo.high_entropy_mask(e, mask[rs], thr) for rs, _, e, _ in groups]
        # the bonus's tokens and their entropy, all ranks (the controller's measurement)
        kept = _sum(torch.stack([sum((k.sum() for k in keeps), torch.tensor(0.0)),
                                 sum(((e.detach() * k).sum() for (_, _, e, _), k in zip(groups, keeps)),
                                     torch.tensor(0.0))]))
        coef = ctrl.coef_to_apply() if ctrl else s.entropy_coef
        # loss, kl·tokens, entropy·tokens (KL measured even when beta = 0), exact successes, reward
        sums = torch.zeros(5)
        for rs, logps, ent, ref_logps in groups:
            m = mask[rs]
            loss, _ = group_loss(logps, ref_logps, adv[rs], m, s, n_seqs, n_tokens, entropies=ent,
                                 entropy_threshold=thr, n_entropy_tokens=kept[0].item(), entropy_coef=coef)
            loss.backward()
            with torch.no_grad():
                sums += torch.stack([loss.detach(), (grpo.k3_kl(logps, ref_logps) * m).sum(),
                                     (ent * m).sum(), torch.tensor(0.0), torch.tensor(0.0)])
        del groups
        sums[3] = sum(float(exact(p, c)) for p, c in zip(ro.prompts, ro.completions))  # whatever the reward's checker
        sums[4] = ro.rewards.sum()
        for p in policy.parameters():  # the loss shares already sum to the global loss
            if p.grad is not None:
                _sum(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s.max_grad_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sums = _sum(sums)
        rec = {"step": step, "loss": sums[0].item(), "kl": sums[1].item() / n_tokens,
               "entropy": sums[2].item() / n_tokens, "success": sums[3].item() / n_seqs,
               "reward": sums[4].item() / n_seqs, "completion_tokens": n_tokens / n_seqs, "grad_norm": grad_norm}
        if bonus:  # as TRL logs it: after the controller's update (the coefficient for the next step)
            rec["entropy_coef"] = ctrl.update((kept[1] / kept[0].clamp(min=1.0)).item()) if ctrl else coef
        if s.eval_every and (step + 1) % s.eval_every == 0:
            rec["test_success"] = greedy_success(policy, tok, eval_rows)
            policy.train()
        history.append(rec)
        bar.set_postfix(success=f"{rec['success']:.2f}", kl=f"{rec['kl']:.3f}", refresh=False)
        # every input to a stop decision is all-reduced: a rank that stopped alone would leave the
        # others waiting in the next all_gather
        if s.stop_at_success is not None and rec.get("test_success", -1.0) >= s.stop_at_success:
            break
    policy.eval()
    return {"history": history, "settings": asdict(s),
            "state": {k: v.detach().clone() for k, v in policy.state_dict().items()}}


def train_on_ranks(rows, s: GRPOSettings, world_size: int, progress: bool = False, timeout: float = 600,
                   eval_rows=None) -> dict:
    """`train_grpo` on `world_size` ranks (gloo, one thread each so layouts compute alike); rank 0's result."""
    from dpo_lab.parallel.launch import launch
    return launch(train_grpo, world_size, args=(rows, s), kwargs={"progress": progress, "eval_rows": eval_rows},
                  timeout=timeout, threads_per_rank=1)[0]


def ws2_vs_ws1_max_abs_diff(rows, s: GRPOSettings, eval_rows=None) -> dict:
    """Run `s` on 1 and on 2 ranks: {"params": max |Δ| of the final parameters, "metrics": of the
    per-step metrics, "ws1"/"ws2": both results}, for a notebook figure."""
    one, two = (train_on_ranks(rows, s, w, eval_rows=eval_rows) for w in (1, 2))
    if len(one["history"]) != len(two["history"]):
        raise RuntimeError(f"1 rank ran {len(one['history'])} records, 2 ranks {len(two['history'])}")
    params = max((one["state"][k] - two["state"][k]).abs().max().item() for k in one["state"])
    metrics = max(abs(a[k] - b[k]) for a, b in zip(one["history"], two["history"]) for k in a | b)
    return {"params": params, "metrics": metrics, "ws1": one, "ws2": two}
