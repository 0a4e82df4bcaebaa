"""TRL's own GRPO code on a batch we choose: the twin that `grpo.py` is tested against.

A real `GRPOTrainer` is built offline on the tiny model (one per process, reused). For the loss we
call its `_compute_loss` with a stand-in model that returns the per-token log-probs (and entropies)
we give it, as a model patched with TRL's fused LM head would; for the advantages we call its
`_generate_and_score_completions` with a `rollout_func` that returns our completions and a reward
function that returns our rewards, so TRL's grouping and normalisation code runs unchanged.
"""
import logging
import os
import tempfile
import warnings

import torch

_TRAINERS = {}
LOSS_PARAMS = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
               "vespo_lambda_neg")  # GRPOConfig fields _compute_loss reads from self.args
ENTROPY_PARAMS = ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")


class GivenLogps(torch.nn.Module):
    """Returns given completion log-probs (B, C) and entropies as TRL's fused-head output over the
    whole sequence (B, P+C−1); TRL keeps the last C columns."""

    def __init__(self, token_logps, entropies, prompt_len):
        super().__init__()
        self.token_logps, self.entropies, self.prompt_len = token_logps, entropies, prompt_len

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        from trl.trainer.utils import FusedCausalLMOutput
        assert fused_lm_head, "TRL's GRPO loss asks for the fused LM head"
        pad = torch.zeros(self.token_logps.shape[0], self.prompt_len - 1)
        lp = torch.cat([pad, self.token_logps], 1)
        ent = torch.cat([pad, self.entropies], 1)
        on = labels[:, 1:] != -100
        return FusedCausalLMOutput(log_probs=lp, entropy=ent, mean_logits=torch.zeros_like(ent),
                                   is_top1=on & False, label_mask=on)


def trainer(num_generations: int = 2, batch_size: int = 4, scale_rewards: str = "group",
            max_completion_length: int = 8, rollout_func=None, reward_func=None):
    """A real GRPOTrainer on the tiny random model, no reference model (beta=0 at build time)."""
    key = (num_generations, batch_size, scale_rewards, max_completion_length, rollout_func, reward_func)
    if key in _TRAINERS:
        return _TRAINERS[key]
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from dpo_lab.dpo.trl_recipe import checkpointing_args
    from dpo_lab.models import build_tiny_model, build_tokenizer
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-lab-grpo-"), report_to=[], use_cpu=True,
                      per_device_train_batch_size=batch_size, num_generations=num_generations,
                      max_completion_length=max_completion_length, scale_rewards=scale_rewards,
                      beta=0.0, bf16=False, max_steps=1, seed=0, disable_tqdm=True,
                      **checkpointing_args(False))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from datasets.utils.logging import disable_progress_bar
        disable_progress_bar()
        t = GRPOTrainer(model=build_tiny_model(seed=0), args=args, processing_class=build_tokenizer(),
                        reward_funcs=reward_func or (lambda completions, **_: [0.0] * len(completions)),
                        train_dataset=Dataset.from_list([{"prompt": "1+2="}] * batch_size),
                        rollout_func=rollout_func)
    _TRAINERS[key] = t
    return t


def trl_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type="dapo", epsilon_low=0.2,
             epsilon_high=None, beta=0.0, max_completion_length=None, kl_ratio_correction=False,
             importance_sampling_level="token", delta=None, entropies=None, prompt_len=3,
             off_policy_mask_threshold=None, top_entropy_quantile=1.0, entropy_coef=0.0, adaptive_entropy=None,
             **loss_params):
    """TRL 1.16's `GRPOTrainer._compute_loss` on these per-token tensors (B, C): (loss, logged metrics).
    Backward through the loss reaches `logps`. `loss_params`: GRPOConfig's sapo_* / vespo_* fields
    (any left out take GRPOConfig's defaults, so one cached trainer serves every call).
    `adaptive_entropy`: None (static `entropy_coef`), a dict of GRPOConfig's entropy_coef_min / _max /
    _delta / entropy_target to start a controller at `entropy_coef`, or "continue" to take one more
    optimizer step with the controller state TRL kept from the previous call."""
    from trl import GRPOConfig
    t = trainer()
    b, c = mask.shape
    t.loss_type, t.beta = loss_type, beta
    t.epsilon_low = epsilon_low
    t.epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    t.max_completion_length = max_completion_length or c
    t.current_gradient_accumulation_steps = 1
    t.args.use_bias_correction_kl = kl_ratio_correction
    t.importance_sampling_level, t.args.delta = importance_sampling_level, delta
    t.off_policy_mask_threshold = off_policy_mask_threshold
    for name in LOSS_PARAMS:
        setattr(t.args, name, loss_params.pop(name, GRPOConfig.__dataclass_fields__[name].default))
    t.top_entropy_quantile = top_entropy_quantile
    if adaptive_entropy != "continue":  # a fresh controller (or none): TRL's __init__ state
        t.use_adaptive_entropy = adaptive_entropy is not None
        t.entropy_coef = entropy_coef
        t._entropy_bonus_enabled = entropy_coef != 0.0 or t.use_adaptive_entropy
        t._last_world_entropy, t._entropy_window_stats = float("inf"), None
        params = dict(adaptive_entropy or {})
        if set(params) - set(ENTROPY_PARAMS):
            raise TypeError(f"trl_loss: adaptive_entropy options {sorted(set(params) - set(ENTROPY_PARAMS))}; "
                            f"expected some of {ENTROPY_PARAMS}")
        for name in ENTROPY_PARAMS:  # left out: GRPOConfig's default, whatever an earlier call set
            setattr(t.args, name, params.get(name, GRPOConfig.__dataclass_fields__[name].default))
    t.accelerator.gradient_state._set_sync_gradients(True)  # every call is one whole optimizer step
    if loss_params:
        raise TypeError(f"trl_loss: unknown options {sorted(loss_params)}; GRPOConfig loss fields are {LOSS_PARAMS}")
    ents = torch.zeros(b, c) if entropies is None else entropies
    inputs = {"prompt_ids": torch.ones(b, prompt_len, dtype=torch.long),
              "prompt_mask": torch.ones(b, prompt_len, dtype=torch.long),
              "completion_ids": torch.ones(b, c, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logps,
              "num_items_in_batch": mask.sum().float()}
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logps
    t.model.train()
    t._metrics["train"].clear()
    with warnings.catch_warnings():  # transformers 5 deprecates the name TRL reads in it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        loss = t._compute_loss(GivenLogps(logps, ents, prompt_len), inputs)
    return loss, {k: v[-1] for k, v in t._metrics["train"].items()}


def trl_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """TRL's advantages for `rewards` (N·G,), completions grouped by prompt as TRL's sampler lays them."""
    n = rewards.numel()
    t = trainer(num_generations=G, batch_size=n, scale_rewards=scale, rollout_func=_given_rollout,
                reward_func=_given_reward)
    _GIVEN["rewards"] = rewards.tolist()
    t.model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        out = t._generate_and_score_completions([{"prompt": f"{i // G}+1="} for i in range(n)])
    return out["advantages"]


_GIVEN = {}  # the rewards / completions handed to TRL; module-level so the cached trainers keep working


def trl_truncation_mask(completion_ids: list[list[int]], G: int) -> torch.Tensor:
    """TRL's completion_mask (rows, max length) with mask_truncated_completions=True for these
    completions (each unpadded: up to and with its EOS, or cut), through `_generate_and_score_completions`."""
    n = len(completion_ids)
    t = trainer(num_generations=G, batch_size=n, rollout_func=_given_completions, reward_func=_given_reward)
    t.mask_truncated_completions = True
    _GIVEN["rewards"], _GIVEN["completions"] = [0.0] * n, completion_ids
    t.model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        out = t._generate_and_score_completions([{"prompt": f"{i // G}+1="} for i in range(n)])
    return out["completion_mask"]


def _given_completions(prompts, trainer_):
    n = len(prompts)
    return {"prompt_ids": [[1, 2]] * n, "completion_ids": _GIVEN["completions"],
            "logprobs": [[0.0] * len(c) for c in _GIVEN["completions"]], "index": list(range(n))}


def _given_rollout(prompts, trainer_):  # any ids: only the rewards matter to the advantages
    n = len(prompts)
    return {"prompt_ids": [[1, 2]] * n, "completion_ids": [[3, 4]] * n, "logprobs": [[0.0, 0.0]] * n,
            "index": list(range(n))}


def _given_reward(completions, index, **_):
    return [_GIVEN["rewards"][i] for i in index]


def loss_vs_trl_max_abs_diff(G: int = 4, n_prompts: int = 3, c: int = 7, seed: int = 0) -> dict:
    """The largest |ours − TRL| over every loss_type (× scale for grpo/bnpo/dr_grpo/dapo) × beta ∈
    {0, 0.04} × KL form × clipping off/on, GSPO / two-sided clipping, sequence-level LUSPO and SAPO, each type's second parameter
    setting and the off-policy mask, on one ragged batch: {"advantages", "loss", "grad", "metrics",
    "cases"}, for a notebook figure."""
    import itertools

    from dpo_lab.rl import grpo
    g = torch.Generator().manual_seed(seed)
    b = n_prompts * G
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    logps = -torch.rand(b, c, generator=g) * 3
    mask = (torch.arange(c) < torch.randint(1, c + 1, (b, 1), generator=g)).float()
    ref = logps + 0.3 * torch.randn(b, c, generator=g)
    noise = torch.randn(b, c, generator=g)
    worst = dict.fromkeys(("advantages", "loss", "grad", "metrics"), 0.0)
    # the scale only changes the advantages (compared on their own below): the types added after the
    # first four run with "group" only, which keeps the sweep's cost down
    grid = [(scale, dict(loss_type=lt, beta=beta, kl_ratio_correction=corr), spread)
            for lt in grpo.TRL_LOSS_TYPES for scale, beta, corr, spread in itertools.product(
                grpo.SCALES if lt in grpo.LOSS_TYPES else ("group",), (0.0, 0.04), (False, True), (0.01, 0.6))]
    grid += [("group", dict(loss_type="grpo", beta=beta, kl_ratio_correction=True, importance_sampling_level=lvl,
                            delta=delta), spread)  # GSPO and two-sided clipping
             for (lvl, delta), beta, spread in itertools.product(
                 [("sequence", None), ("token", 1.1), ("sequence", 1.1)], (0.0, 0.04), (0.01, 0.6))]
    grid += [("group", dict(loss_type=lt, beta=beta, kl_ratio_correction=True, importance_sampling_level="sequence"),
              spread) for lt, beta, spread in itertools.product(("luspo", "sapo"), (0.0, 0.04), (0.01, 0.6))]
    grid += [("group", dict(beta=beta, **params), spread)  # a binding ε_max; other temperatures / Gamma shapes
             for params, beta, spread in itertools.product(
                 [dict(loss_type="cispo", epsilon_high=1.2),
                  dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
                  dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=2.0,
                       vespo_lambda_neg=4.0)],
                 (0.0, 0.04), (0.01, 0.6))]
    grid += [("group", dict(loss_type=lt, off_policy_mask_threshold=0.05), 0.6) for lt in grpo.TRL_LOSS_TYPES]
    for scale in grpo.SCALES:
        adv = grpo.group_advantages(rewards, G, scale)
        worst["advantages"] = max(worst["advantages"], (adv - trl_advantages(rewards, G, scale)).abs().max().item())
    cases = 0
    for scale, options, spread in grid:
        adv = grpo.group_advantages(rewards, G, scale)
        # CISPO's ε_high is a cap on the ratio itself: ScaleRL's 5.0 unless the case sets one
        kw = dict(epsilon_low=0.2, epsilon_high=5.0 if options["loss_type"] == "cispo" else 0.28)
        kw.update(options)
        old = logps + spread * noise
        x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        ours, om = grpo.grpo_loss(x, old, ref, adv, mask, **kw)
        theirs, tm = trl_loss(y, old, ref, adv, mask, **kw)
        ours.backward(), theirs.backward()
        worst["loss"] = max(worst["loss"], abs(ours.item() - theirs.item()))
        worst["grad"] = max(worst["grad"], (x.grad - y.grad).abs().max().item())
        worst["metrics"] = max(worst["metrics"], 0.0, *(abs(v - tm[k]) for k, v in om.items()))  # sapo: none
        cases += 1
    return {**worst, "cases": cases}
