"""Checks of notebook 06's exercises (DPO with FSDP + QLoRA)."""
import copy
import warnings

import torch
import torch.nn.functional as F

from dpo_lab.exercises import Wrong, exercise, expect_close


# --- 06.1 the reference forward: the same weights, adapters off --------------------------------------

def _tiny_peft_model():
    """A 2-layer model with LoRA whose adapters are already trained (B ≠ 0, so policy ≠ reference),
    and `twin`: the same base weights never wrapped by peft, the reference the check trusts."""
    from peft import LoraConfig, get_peft_model

    from dpo_lab.models import build_tiny_model
    base = build_tiny_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1)
    twin = copy.deepcopy(base).eval()
    with warnings.catch_warnings():  # transformers' deprecation notice, raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model, twin


def _batch(pad_id: int):
    """Two pairs in the trainer's layout ([chosen; rejected], right-padded), with unequal lengths."""
    from dpo_lab.dpo.batching import collate
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 60, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt_ids": ids(4), "chosen_ids": ids(3), "rejected_ids": ids(5)},
             {"prompt_ids": ids(6), "chosen_ids": ids(4), "rejected_ids": ids(2)}]
    return collate(pairs, pad_id)


def _logps(logits, batch, mask, shift=True, mean=False):
    """Summed completion log-probs with F.cross_entropy (not dpo_lab's log_softmax + gather)."""
    ids = batch["input_ids"]
    labels = ids.masked_fill(~mask.bool(), -100)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    total = -nll.sum(-1)
    return total / (labels != -100).sum(-1).clamp(min=1) if mean else total


@exercise("06.1", "the reference forward, adapters off")
def check_reference_logps(fn):
    """fn(model, batch) -> (chosen_logps, rejected_logps), each (B,): the summed completion
    log-probs of the reference (the peft model with its adapters disabled), without gradients,
    leaving the model as it found it (adapters on, same train/eval mode)."""
    model, twin = _tiny_peft_model()
    batch = _batch(model.config.pad_token_id)
    with torch.no_grad():
        ref_logits = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pol_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = _logps(ref_logits, batch, batch["loss_mask"])
    policy = _logps(pol_logits, batch, batch["loss_mask"])
    misreadings = [
        (policy, "these are the policy's log-probs: the adapters were on. Run the forward inside "
                 "`with model.disable_adapter():` (the reference is the base without LoRA)"),
        (_logps(ref_logits, batch, batch["loss_mask"], shift=False),
         "the logits are not shifted: logits[:, t] predicts input_ids[:, t + 1]"),
        (_logps(ref_logits, batch, batch["attention_mask"]),
         "the prompt tokens are counted: sum over the completion only (loss_mask), not attention_mask"),
        (_logps(ref_logits, batch, batch["loss_mask"], mean=True),
         "these are per-token means: DPO sums the completion's log-probs"),
        (torch.cat(want.chunk(2)[::-1]), "chosen and rejected are swapped: the first half of the rows is chosen"),
    ]

    grad_during_forward = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args: grad_during_forward.append(torch.is_grad_enabled()))
    try:
        for mode in ("train", "eval"):  # the trainer calls it in train mode, the evaluation in eval
            model.train(mode == "train")
            grad_during_forward.clear()
            out = fn(model, batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(map(torch.is_tensor, out))):
                raise Wrong("return the tuple (chosen_logps, rejected_logps): split the 2B rows in "
                            "halves, chosen first (tensor.chunk(2))")
            got = torch.cat([out[0], out[1]])
            if got.shape != want.shape:
                raise Wrong(f"chosen and rejected have {out[0].numel()} and {out[1].numel()} values, "
                            f"expected {want.numel() // 2} each (one summed log-prob per pair)")
            if any(grad_during_forward) or got.requires_grad:
                raise Wrong("the reference forward tracked gradients: run it under torch.no_grad() (the "
                            "reference is a constant, and tracking keeps every activation alive)")
            if model.training != (mode == "train"):
                raise Wrong(f"the model came in {mode} mode and left in "
                            f"{'train' if model.training else 'eval'} mode: leave the mode as you found "
                            "it (the policy's forward and dropout depend on it)")
            if not torch.allclose(got.double(), want.double(), atol=1e-4, rtol=1e-5):
                for wrong, why in misreadings:
                    if torch.allclose(got.double(), torch.cat(list(wrong.chunk(2))).double(), atol=1e-4, rtol=1e-5):
                        raise Wrong(why)
                expect_close(got, want, "the reference log-probs", atol=1e-4, rtol=1e-5)
            with torch.no_grad():
                after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not torch.allclose(_logps(after, batch, batch["loss_mask"]), policy, atol=1e-4):
                raise Wrong("after your function the adapters are still off, so the next policy forward "
                            "is the reference: use `with model.disable_adapter():`, which turns them "
                            "back on when the block ends")
    finally:
        hook.remove()


# --- 06.2 reading a training log ----------------------------------------------------------------------

def _log(start, acc, margins, logps_c, logps_r, rewards_c, rewards_r):
    """Records with the trainer's (TRL's) keys; only the fields the exercise reads vary."""
    n = len(acc)
    ends = lambda a, b: [a + (b - a) * i / (n - 1) for i in range(n)]  # noqa: E731
    lc, lr, rc, rr = (v if isinstance(v, list) else ends(*v) for v in (logps_c, logps_r, rewards_c, rewards_r))
    return [{"step": start + i, "loss": 0.69 - 0.05 * i, "rewards/chosen": rc[i], "rewards/rejected": rr[i],
             "rewards/margins": margins[i], "rewards/accuracies": acc[i], "logps/chosen": lc[i],
             "logps/rejected": lr[i], "grad_norm": 1.0 + 0.1 * i, "learning_rate": 1e-3} for i in range(n)]


# (history, threshold, drop): each misreading below gives a different answer on at least one log
_LOGS = [
    (_log(7, [0.0, 0.5, 0.75, 0.8, 0.9, 0.7], [0.0, 0.9, 0.2, 0.3, 1.0, 1.1],
          (-10, -18), (-12, -30), (0, -0.8), (0, -1.8)), 0.75, 5.0),   # resumed at step 7; collapsing
    (_log(1, [0.0, 0.25, 0.5, 0.6, 0.55], [0.0, 0.5, 1.2, 2.0, 2.5],
          (-10, -9), (-12, -25), (0, 0.1), (0, -1.3)), 0.75, 5.0),     # never above; only rejected fell
    (_log(25, [0.8, 0.9, 1.0, 1.0], [0.3, 0.5, 0.8, 1.0],
          (-10, -17), (-12, -13), (0, -6), (0, -7)), 0.75, 5.0),       # above from the first record
    (_log(1, [0.5, 0.5, 0.75], [0.1, 0.6, 0.2],
          (-20, -14), (-22, -15), (0, 0.5), (0, 0.6)), 0.5, 5.0),      # both rose; one record at 0.5
]


def _first(hist, above, answer):
    return next((answer(i, r) for i, r in enumerate(hist) if above(r)), None)


def _fell(hist, key, drop):
    return hist[0][key] - hist[-1][key] > drop


# the right reading first, then the misreadings the check names
_STEP_READINGS = [
    (lambda h, t: _first(h, lambda r: r["rewards/accuracies"] > t, lambda i, r: r["step"]), None),
    (lambda h, t: _first(h, lambda r: r["rewards/accuracies"] > t, lambda i, r: i),
     "you returned the record's position in the list, not its 'step' field (a log resumed from a "
     "checkpoint starts at a later step)"),
    (lambda h, t: _first(h, lambda r: r["rewards/accuracies"] > t, lambda i, r: i + 1),
     "you counted records from 1 instead of reading the 'step' field (a log resumed from a "
     "checkpoint starts at a later step)"),
    (lambda h, t: _first(h, lambda r: r["rewards/margins"] > t, lambda i, r: r["step"]),
     "you read rewards/margins (β·Δ, in nats): the share of pairs ranked right is rewards/accuracies"),
    (lambda h, t: _first(h, lambda r: r["rewards/accuracies"] >= t, lambda i, r: r["step"]),
     "a record exactly at the threshold does not exceed it: use >, not >="),
    (lambda h, t: _first(h[::-1], lambda r: r["rewards/accuracies"] > t, lambda i, r: r["step"]),
     "you returned the last step above the threshold: the question is the first"),
]
_UNLEARNING_READINGS = [
    (lambda h, d: _fell(h, "logps/chosen", d) and _fell(h, "logps/rejected", d), None),
    (lambda h, d: _fell(h, "rewards/chosen", d) and _fell(h, "rewards/rejected", d),
     "you read rewards/chosen and rewards/rejected: those are β·(log π − log π_ref), log-ratios to "
     "the reference; the policy's own log-probs are logps/chosen and logps/rejected"),
    (lambda h, d: _fell(h, "logps/chosen", d),
     "you looked at logps/chosen only: unlearning is when logps/chosen AND logps/rejected both fall"),
    (lambda h, d: _fell(h, "logps/rejected", d),
     "a falling logps/rejected alone is DPO doing its job: unlearning is when logps/chosen and "
     "logps/rejected both fall"),
    (lambda h, d: _fell(h, "logps/chosen", d) or _fell(h, "logps/rejected", d),
     "you flag a run where only one of logps/chosen, logps/rejected fell: unlearning needs both"),
    (lambda h, d: -(h[0]["logps/chosen"] - h[-1]["logps/chosen"]) > d
     and -(h[0]["logps/rejected"] - h[-1]["logps/rejected"]) > d,
     "the sign is flipped: you flag log-probs that rose; a fall is first − last > drop"),
]


def _name(got, readings, args):
    """The diagnosis of the misreading that gives every one of the student's answers, if one does."""
    for reading, why in readings[1:]:
        if all(reading(*a) == g for a, g in zip(args, got)):
            return why
    return None


@exercise("06.2", "reading a training log")
def check_read_log(fn):
    """fn(history, threshold, drop) -> (first_step, unlearning) on hand-made logs with the trainer's
    keys, against the reading written out here."""
    steps, flags = [], []
    for hist, t, d in _LOGS:
        out = fn(copy.deepcopy(hist), t, d)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise Wrong("return the tuple (first_step, unlearning)")
        steps.append(out[0])
        flags.append(out[1])
    step_args = [(h, t) for h, t, _ in _LOGS]
    want = [_STEP_READINGS[0][0](*a) for a in step_args]
    if steps != want:
        why = _name(steps, _STEP_READINGS, step_args)
        if why:
            raise Wrong(why)
        i = next(i for i, (g, w) in enumerate(zip(steps, want)) if g != w)
        hist, t, _ = _LOGS[i]
        if want[i] is None:
            raise Wrong(f"no record of the log of steps {hist[0]['step']}–{hist[-1]['step']} has "
                        f"rewards/accuracies above {t}, so return None; got {steps[i]!r}")
        raise Wrong(f"on the log of steps {hist[0]['step']}–{hist[-1]['step']} with threshold {t}, "
                    f"the first step is {want[i]}, got {steps[i]!r}")
    unl_args = [(h, d) for h, _, d in _LOGS]
    want = [_UNLEARNING_READINGS[0][0](*a) for a in unl_args]
    if [bool(f) for f in flags] != want:
        why = _name([bool(f) for f in flags], _UNLEARNING_READINGS, unl_args)
        if why:
            raise Wrong(why)
        i = next(i for i, (g, w) in enumerate(zip(flags, want)) if bool(g) != w)
        hist = _LOGS[i][0]
        raise Wrong(f"on a log where logps/chosen went {hist[0]['logps/chosen']:g} → {hist[-1]['logps/chosen']:g} "
                    f"and logps/rejected {hist[0]['logps/rejected']:g} → {hist[-1]['logps/rejected']:g} "
                    f"(drop {_LOGS[i][2]:g}), unlearning is {want[i]}, got {flags[i]!r}")
