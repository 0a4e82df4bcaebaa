"""Our DPO loss against TRL's DPOTrainer on identical inputs.

TRL builds the batch (tokenisation, EOS, padding, completion mask) and computes its loss and
metrics with its own code; we take the same batch through `sequence_logps` + `dpo_loss` +
`dpo_metrics` and report the largest difference per loss variant.

TRL >= 1.0 applies label smoothing only in the robust, EXO and AOT losses. AOT sorts the
log-ratios across the batch; with one pair per batch the sort is the identity and AOT is exactly
conservative DPO (ε-smoothed sigmoid), so that variant is compared pair by pair.
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


def _trainer(policy, ref, tokenizer, rows, beta, trl_loss, eps):
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
                     **checkpointing_args(True))
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
