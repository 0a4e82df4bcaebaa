"""Our DPO loss against TRL's DPOTrainer on identical inputs.

TRL builds the batch (tokenisation, EOS, padding, completion mask) and computes its loss and
metrics with its own code; we take the same batch through `sequence_logps` + `dpo_loss` +
`dpo_metrics` and report the largest difference per loss variant.

TRL >= 1.0 applies label smoothing only in the robust, EXO and AOT losses. AOT sorts the
log-ratios across the batch; with one pair per batch the sort is the identity and AOT is exactly
conservative DPO (ε-smoothed sigmoid), so that variant is compared pair by pair.

`trl_loss_on_logps` runs TRL's own loss code (`DPOTrainer._compute_loss`) on per-token log-probs
we choose, for the loss zoo's tests: every loss type, f-divergence, weighting and `ld_alpha`.
"""
import logging
import tempfile
import warnings

import torch

from dpo_lab.dpo.loss import completion_logit_sums, dpo_loss, dpo_metrics, sequence_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
# our name -> (TRL loss_type, label smoothing, pair-by-pair)
VARIANTS = {
    "sigmoid": ("sigmoid", 0.0, False),
    "ipo": ("ipo", 0.0, False),
    "hinge": ("hinge", 0.0, False),
    "robust": ("robust", 0.1, False),
    "conservative": ("aot", 0.1, True),
}


def _trainer(policy, ref, tokenizer, rows, beta, trl_loss, eps, checkpointing=True):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_lab.dpo.trl_recipe import checkpointing_args
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-lab-trl-"), beta=beta, loss_type=[trl_loss],
                     label_smoothing=eps, per_device_train_batch_size=len(rows), report_to=[],
                     use_cpu=True, max_steps=1, seed=0, disable_tqdm=True,
                     # TRL defaults to bf16, and accelerate then patches the *reference* model's
                     # forward in place with bf16 autocast (on CPU too): compare in fp32.
                     bf16=False,
                     # TRL's default (on), under the name this transformers reads (no FutureWarning)
                     **checkpointing_args(checkpointing))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from datasets.utils.logging import disable_progress_bar
        disable_progress_bar()
        return DPOTrainer(model=policy, ref_model=ref, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _trl_loss_and_metrics(trainer, batch):
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    return loss.item(), {k: trainer._metrics["train"][k][-1] for k in METRICS}


def _ours(policy, ref, batch, beta, loss_type, eps):
    ids, attn, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logits = policy(input_ids=ids, attention_mask=attn).logits
    logps = sequence_logps(logits, ids, cmask)
    with torch.no_grad():
        ref_logps = sequence_logps(ref(input_ids=ids, attention_mask=attn).logits, ids, cmask)
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    lc, lr = cmask.sum(1).chunk(2)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, chosen_lengths=lc, rejected_lengths=lr)
    return dpo_metrics(losses, cr, rj, pc, pr, completion_logit_sums(logits, cmask))


def compare_with_trl(policy, ref, tokenizer, rows, beta: float = 0.1, variants=tuple(VARIANTS)) -> dict:
    """{variant: {"loss": max |ours − TRL| of the loss, "metrics": of the METRICS}} on one batch."""
    policy.train(), ref.eval()
    diffs = {}
    for name in variants:
        trl_loss, eps, pairwise = VARIANTS[name]
        ours_type = "sigmoid" if name == "conservative" else name
        trainer = _trainer(policy, ref, tokenizer, rows, beta, trl_loss, eps)
        batch = next(iter(trainer.get_train_dataloader()))
        n = len(rows)
        pieces = [[i, i + n] for i in range(n)] if pairwise else [list(range(2 * n))]
        worst = {"loss": 0.0, "metrics": 0.0}
        for idx in pieces:
            sub = {k: v[idx] for k, v in batch.items()}
            t_loss, t_metrics = _trl_loss_and_metrics(trainer, sub)
            ours = _ours(policy, ref, sub, beta, ours_type, eps)
            worst["loss"] = max(worst["loss"], abs(ours["loss"] - t_loss))
            worst["metrics"] = max(worst["metrics"], *(abs(ours[k] - t_metrics[k]) for k in METRICS))
        diffs[name] = worst
    return diffs


# --- TRL's loss code on given log-probs -------------------------------------------------------------

# The DPOTrainer attributes its __init__ sets from DPOConfig and `_compute_loss` reads (TRL 1.16).
LOSS_SETTINGS = ("beta", "loss_types", "loss_weights", "label_smoothing", "f_divergence_type",
                 "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "precompute_ref_logps")


class GivenLogps(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns the given per-token log-probs
    (2B, T−1), zero where the label is −100 as TRL's head does, so TRL's loss runs on chosen values."""

    def __init__(self, token_logps: torch.Tensor):
        super().__init__()
        self.token_logps = token_logps

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        from trl.trainer.utils import FusedCausalLMOutput
        assert fused_lm_head, "TRL's DPO loss asks for the fused LM head"
        on = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.token_logps, dtype=torch.float32).detach()
        return FusedCausalLMOutput(log_probs=self.token_logps.masked_fill(~on, 0.0), entropy=zeros,
                                   mean_logits=zeros, is_top1=on & False, label_mask=on)


def zoo_trainer():
    """The smallest real DPOTrainer (tiny random models, two rows, no checkpointing), built once and
    reused: `trl_loss_on_logps` only swaps the loss settings and the models."""
    from dpo_lab import task
    from dpo_lab.models import build_tiny_model, build_tokenizer
    rows = task.read_jsonl(task.TASK_DIR / "test.jsonl")[:2]
    return _trainer(build_tiny_model(seed=0), build_tiny_model(seed=1), build_tokenizer(), rows, 0.1,
                    "sigmoid", 0.0, checkpointing=False)


def trl_loss_on_logps(trainer, token_logps, ref_token_logps, completion_mask, beta=0.1, loss_type="sigmoid",
                      label_smoothing=0.0, loss_weights=None, f_divergence_type="reverse_kl",
                      f_alpha_divergence_coef=0.5, ld_alpha=None, discopop_tau=0.05):
    """TRL's loss and logged metrics for per-token log-probs (2B, T−1) of rows [chosen; rejected]
    whose completions `completion_mask` (2B, T) marks. The settings go where DPOTrainer.__init__ puts
    them (TRL's own checks on them run in DPOConfig/__init__, not here). Backward through the returned
    loss reaches `token_logps`."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    settings = dict(beta=beta, loss_types=types, loss_weights=list(loss_weights or [1.0] * len(types)),
                    label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                    f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha,
                    use_weighting=False, precompute_ref_logps=False)
    missing = [k for k in LOSS_SETTINGS if not hasattr(trainer, k)]
    if missing or not hasattr(trainer.args, "discopop_tau"):  # a TRL that renamed them: say so
        raise AttributeError(f"this TRL's DPOTrainer has no {missing or ['args.discopop_tau']}")
    for k, v in settings.items():
        setattr(trainer, k, v)
    trainer.args.discopop_tau = discopop_tau
    trainer.ref_model = GivenLogps(ref_token_logps)
    n, t = completion_mask.shape
    inputs = {"input_ids": torch.zeros(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": completion_mask.long()}
    trainer.model.train()
    trainer._metrics["train"].clear()
    with warnings.catch_warnings():  # transformers 5 deprecates the name TRL reads in it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        loss = trainer._compute_loss(GivenLogps(token_logps), inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}
