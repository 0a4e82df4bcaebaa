"""The arms of notebook 15's comparison, from the same SFT model: DPO on the shipped pairs, DPO on
pairs mined from the model's own samples (on-policy, built with the checker), and GRPO; each
evaluated by greedy success and pass@k on held-out problems, with its compute (`compare.Compute`).

DPO runs `dpo.zoo`'s single-process LoRA loop (the sigmoid loss, Rafailov et al. 2023): the same loss
as lesson 06's trainer without its ranks and 4-bit weights, so that seeds × arms fit in a smoke run.
"""
import torch

from dpo_lab.dpo import zoo
from dpo_lab.dpo.batching import BatchPlan
from dpo_lab.models import build_tokenizer, sft_model_dir, task_success
from dpo_lab.rl import compare
from dpo_lab.rl.rollout import exact, rollout

EVAL_STEP = 10**6  # the rollout "step" of evaluation samples: never one a training run draws


def prompt_tokens(tok, rows) -> int:
    return len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])


def evaluate(model, tok, rows, k: int = 8, seed: int = 0, max_new_tokens: int = 6) -> dict:
    """Greedy success, and pass@1 and pass@k from n = k samples per prompt at temperature 1."""
    ro = rollout(model, tok, [r["prompt"] for r in rows], k, seed=seed, step=EVAL_STEP,
                 max_new_tokens=max_new_tokens, checker=exact)
    c = ro.rewards.view(-1, k).sum(1).long().tolist()
    return {"greedy": task_success(model, tok, rows),
            "pass@1": sum(compare.pass_at_k(k, ci, 1) for ci in c) / len(c),
            f"pass@{k}": sum(compare.pass_at_k(k, ci, k) for ci in c) / len(c)}


def dpo_steps_for(budget: float, rows, batch_size: int, tok) -> int:
    """DPO steps whose compute is closest to `budget` without passing it (from the mean pair)."""
    per_pair = compare.dpo_compute([rows], tok).total / len(rows)
    return max(1, int(budget // (per_pair * batch_size)))


def dpo_arm(rows, steps: int, seed: int, tok, lr: float = 2e-3, batch_size: int = 16, beta: float = 0.1):
    """LoRA DPO from the SFT model on `rows`; returns (model, history, compute)."""
    batch_size = min(batch_size, len(rows))
    model, _ = zoo.lora_policy(sft_model_dir(progress=False), seed)
    history = zoo.train(model, tok, rows, "sigmoid", beta, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    plan = BatchPlan(len(rows), batch_size, 1, 1, seed)  # the batches zoo.train drew
    cost = compare.dpo_compute([[rows[i] for i in plan.global_indices(s)] for s in range(steps)], tok)
    return model, history, cost


def validation_split(rows, every: int = 8):
    """(fit, val): every `every`-th training problem is held back for tuning (each problem is one row,
    no prompt repeats), so that no choice is made on the held-out test problems."""
    return [r for i, r in enumerate(rows) if i % every], rows[::every]


def dpo_lr_sweep(rows, lrs, budget: float, seed: int, tok, every: int = 8, batch_size: int = 16, beta: float = 0.1) -> dict:
    """DPO's learning rate chosen on a validation split of the training problems: one run per lr at
    the steps `budget` buys on the rest, scored by greedy success on the split; ties go to the smaller
    lr. Returns {"best_lr", "val_success": {lr: success}, "steps", "val_problems"}."""
    fit, val = validation_split(rows, every)
    steps = dpo_steps_for(budget, fit, batch_size, tok)
    scores = {lr: task_success(dpo_arm(fit, steps, seed, tok, lr=lr, batch_size=batch_size, beta=beta)[0], tok, val)
              for lr in sorted(lrs)}
    return {"best_lr": max(scores, key=scores.get), "val_success": scores, "steps": steps, "val_problems": len(val)}


def mined_pairs(model, tok, rows, G: int, seed: int, max_new_tokens: int = 6):
    """On-policy pairs: G samples of `model` per prompt of `rows`, paired by the exact checker;
    returns (pairs, sampling compute)."""
    prompts = [r["prompt"] for r in rows]
    ro = rollout(model, tok, prompts, G, seed=seed, step=EVAL_STEP + 1, max_new_tokens=max_new_tokens, checker=exact)
    cost = compare.sampling_compute(len(ro.prompts), prompt_tokens(tok, rows), ro.completion_mask.sum().item() / len(ro.prompts))
    return compare.mine_pairs(ro.prompts, ro.completions, G, exact), cost


def grpo_model(state: dict):
    """A GRPO run's final parameters in a fresh copy of the SFT model."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir(progress=False))
    model.load_state_dict(state)
    return model.eval()


def sft_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(sft_model_dir(progress=False)).eval(), build_tokenizer()


def sft_base_compute(tok) -> compare.Compute:
    """What training the SFT model cost (`models.SFT_DEFAULTS` on the task's sft.jsonl): the base every
    arm starts from, so it is shared by all of them, not part of any arm's budget."""
    from dpo_lab import task
    from dpo_lab.models import SFT_DEFAULTS
    s = SFT_DEFAULTS
    return compare.sft_compute(task.read_jsonl(task.TASK_DIR / "sft.jsonl"), tok, s["steps"], s["batch_size"], s["seed"])


def zero_spread_share(rewards: torch.Tensor, G_max: int, Gs) -> dict:
    """Share of groups whose G rewards are all equal (zero advantage: no gradient), for each G in
    `Gs`, from one rollout of G_max samples per prompt (the first G of each group)."""
    groups = rewards.view(-1, G_max)
    return {G: ((groups[:, :G] == groups[:, :1]).all(1)).float().mean().item() for G in Gs}
