import torch

from tests.wrong_solutions import wrong


def _summed(model, batch, mask_key="loss_mask", shift=True, mean=False):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, mask = batch["input_ids"], batch[mask_key]
    if shift:
        logits, ids, mask = logits[:, :-1], ids[:, 1:], mask[:, 1:]
    token = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    total = (token * mask).sum(-1)
    return (total / mask.sum(-1) if mean else total).chunk(2)


# --- 06.1 ---------------------------------------------------------------------------------------

@wrong("06.1", "the adapters were on")
def reference_adapters_on(model, batch):
    with torch.no_grad():
        return _summed(model, batch)


@wrong("06.1", "tracked gradients")
def reference_with_grad(model, batch):
    with model.disable_adapter():
        return _summed(model, batch)


@wrong("06.1", "left in eval mode")
def reference_leaves_eval_mode(model, batch):
    model.eval()  # "no dropout in the reference", but never restored
    with torch.no_grad(), model.disable_adapter():
        return _summed(model, batch)


@wrong("06.1", "adapters are still off")
def reference_adapters_left_off(model, batch):
    model.base_model.disable_adapter_layers()
    with torch.no_grad():
        return _summed(model, batch)


@wrong("06.1", "not shifted")
def reference_unshifted(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return _summed(model, batch, shift=False)


@wrong("06.1", "prompt tokens are counted")
def reference_with_prompt(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return _summed(model, batch, mask_key="attention_mask")


@wrong("06.1", "per-token means")
def reference_mean(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return _summed(model, batch, mean=True)


@wrong("06.1", "chosen and rejected are swapped")
def reference_swapped(model, batch):
    with torch.no_grad(), model.disable_adapter():
        chosen, rejected = _summed(model, batch)
    return rejected, chosen


# --- 06.2 ---------------------------------------------------------------------------------------

def _unlearning(history, drop, keys=("logps/chosen", "logps/rejected")):
    first, last = history[0], history[-1]
    return all(first[k] - last[k] > drop for k in keys)


@wrong("06.2", "position in the list")
def log_index(history, threshold, drop):
    first = next((i for i, r in enumerate(history) if r["rewards/accuracies"] > threshold), None)
    return first, _unlearning(history, drop)


@wrong("06.2", "counted records from 1")
def log_counts_from_one(history, threshold, drop):
    first = next((i + 1 for i, r in enumerate(history) if r["rewards/accuracies"] > threshold), None)
    return first, _unlearning(history, drop)


@wrong("06.2", "you read rewards/margins")
def log_margins(history, threshold, drop):
    first = next((r["step"] for r in history if r["rewards/margins"] > threshold), None)
    return first, _unlearning(history, drop)


@wrong("06.2", "use >, not >=")
def log_at_or_above(history, threshold, drop):
    first = next((r["step"] for r in history if r["rewards/accuracies"] >= threshold), None)
    return first, _unlearning(history, drop)


@wrong("06.2", "the question is the first")
def log_last_above(history, threshold, drop):
    above = [r["step"] for r in history if r["rewards/accuracies"] > threshold]
    return (above[-1] if above else None), _unlearning(history, drop)


@wrong("06.2", "return None")
def log_minus_one(history, threshold, drop):
    first = next((r["step"] for r in history if r["rewards/accuracies"] > threshold), -1)
    return first, _unlearning(history, drop)


def _first_step(history, threshold):
    return next((r["step"] for r in history if r["rewards/accuracies"] > threshold), None)


@wrong("06.2", "you read rewards/chosen and rewards/rejected")
def log_rewards_as_logps(history, threshold, drop):
    return _first_step(history, threshold), _unlearning(history, drop, ("rewards/chosen", "rewards/rejected"))


@wrong("06.2", "logps/chosen only")
def log_chosen_only(history, threshold, drop):
    return _first_step(history, threshold), _unlearning(history, drop, ("logps/chosen",))


@wrong("06.2", "DPO doing its job")
def log_rejected_only(history, threshold, drop):
    return _first_step(history, threshold), _unlearning(history, drop, ("logps/rejected",))


@wrong("06.2", "only one of")
def log_either(history, threshold, drop):
    first, last = history[0], history[-1]
    return _first_step(history, threshold), any(first[k] - last[k] > drop for k in ("logps/chosen", "logps/rejected"))


@wrong("06.2", "sign is flipped")
def log_rose(history, threshold, drop):
    first, last = history[0], history[-1]
    return _first_step(history, threshold), all(last[k] - first[k] > drop for k in ("logps/chosen", "logps/rejected"))
