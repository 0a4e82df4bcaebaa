"""Evaluate a DPO run on the held-out split of the verifiable task, in one process.

The trained adapter is loaded the way a user would load it (PeftModel.from_pretrained on the
4-bit base), so this also checks that the saved adapter is a valid PEFT adapter. "Before" is the
same model with the adapter disabled, i.e. the SFT model.
"""
import math

import torch
import torch.distributed as dist

from dpo_lab.dpo.batching import collate, concatenated_forward, encode_rows, layout, to_device
from dpo_lab.dpo.logprobs import sequence_terms
from dpo_lab.dpo.qlora import bnb_config, resolve_model, DTYPE


def load_with_adapter(cfg, adapter_dir):
    """4-bit base (as in training) + the saved LoRA adapter, eval mode, on the CPU or GPU 0."""
    from peft import PeftModel

    from dpo_lab.models import load_model
    kwargs = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
    base, tok = load_model(resolve_model(cfg.model.name), dtype=DTYPE[cfg.model.dtype],
                           quantization_config=bnb_config(cfg.quant), **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, tok


@torch.no_grad()
def preference_accuracy(model, tok, rows, beta: float, max_length: int = 64, batch: int = 64) -> dict:
    """Implicit-reward accuracy (a tie counts half) and likelihood accuracy, policy vs reference."""
    enc = encode_rows(tok, rows)
    device = next(model.parameters()).device
    wins = ties = lik = ref_lik = 0.0
    margins = []
    for i in range(0, len(enc), batch):
        b = {k: v.to(device) for k, v in collate(enc[i:i + batch], tok.pad_token_id, max_length).items()}
        pc, pr = concatenated_forward(model, b)
        with model.disable_adapter():
            rc, rr = concatenated_forward(model, b)
        m = (pc - rc) - (pr - rr)
        wins += (m > 0).sum().item()
        ties += (m == 0).sum().item()
        lik += (pc > pr).sum().item()
        ref_lik += (rc > rr).sum().item()
        margins.append(beta * m.float().cpu())
    n = len(enc)
    return {"pref_accuracy": (wins + 0.5 * ties) / n, "likelihood_accuracy": lik / n,
            "ref_likelihood_accuracy": ref_lik / n, "reward_margin": torch.cat(margins).mean().item()}


def generation_success(model, tok, rows, max_new_tokens: int = 8) -> dict:
    """Greedy generation success of the policy (adapter on) and of the SFT model (adapter off),
    plus a few side-by-side examples."""
    from dpo_lab.models import generate
    from dpo_lab.task import is_correct
    prompts = [r["prompt"] for r in rows]
    after = generate(model, tok, prompts, max_new_tokens)
    with model.disable_adapter():
        before = generate(model, tok, prompts, max_new_tokens)
    ok_b = [is_correct(p, c) for p, c in zip(prompts, before)]
    ok_a = [is_correct(p, c) for p, c in zip(prompts, after)]
    examples = [{"prompt": p, "before": b.strip(), "after": a.strip(), "right": r["chosen"]}
                for p, b, a, r in zip(prompts, before, after, rows)]
    return {"task_success_before": sum(ok_b) / len(ok_b), "task_success_after": sum(ok_a) / len(ok_a),
            "fixed": sum(a and not b for a, b in zip(ok_a, ok_b)),
            "broken": sum(b and not a for a, b in zip(ok_a, ok_b)), "examples": examples}


def evaluate_run(cfg, adapter_dir, rows, max_new_tokens: int = 8) -> dict:
    """Both measures on `rows` (held-out {'prompt','chosen','rejected'})."""
    model, tok = load_with_adapter(cfg, adapter_dir)
    out = generation_success(model, tok, rows, max_new_tokens)
    out.update({f"{k}_after" if k != "ref_likelihood_accuracy" else "likelihood_accuracy_before": v
                for k, v in preference_accuracy(model, tok, rows, cfg.dpo.beta,
                                                cfg.data.max_length).items()})
    out["pref_accuracy_before"] = 0.5  # the reference's implicit reward is 0 for every answer
    return out


# --- inside the ranks, on the sharded model ---------------------------------------------------

def _eval_batches(model, rows, cfg, device):
    """This rank's held-out batches in the trainer's layout: (batch, real rows, chunk size).
    Every rank yields the same number of batches (FSDP collectives)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(len(rows) / ws)
    mine = rows[rank * per_rank:(rank + 1) * per_rank]
    pad_id = cfg_pad_id(model)
    # the trainer's layout and head path: eval batches are the largest, full logits would peak here
    chunk_size = cfg.dpo.logps_chunk_size if cfg.dpo.chunked_logps else None
    for b in range(math.ceil(per_rank / cfg.eval.batch)):
        chunk = mine[b * cfg.eval.batch:(b + 1) * cfg.eval.batch]
        real = len(chunk)
        chunk = chunk or rows[:1]  # a rank without rows still joins the collectives
        yield to_device(layout(chunk, pad_id, cfg.data), device), real, chunk_size


@torch.no_grad()
def reference_scores(model, rows, cfg, device) -> list:
    """Collective: the held-out (chosen, rejected) log-probs of `model` as it is now, per batch of
    `evaluate_preferences`: full fine-tuning's reference, scored before the first update."""
    was_training = model.training
    model.eval()
    out = [tuple(t.cpu() for t in sequence_terms(model, batch, chunk)[:2])
           for batch, _, chunk in _eval_batches(model, rows, cfg, device)]
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_preferences(model, rows, cfg, device, reference=None) -> dict:
    """Held-out preference accuracy (implicit reward ranks chosen above rejected; a tie counts
    half, so the reference itself scores 0.5) and likelihood accuracy of policy and reference
    (log πθ(chosen) > log πθ(rejected)). The reference: the model with its adapters off, or
    `reference` (reference_scores' list, full fine-tuning). Collective: rows are split over ranks."""
    sums = torch.zeros(6, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b, (batch, real, chunk_size) in enumerate(_eval_batches(model, rows, cfg, device)):
        pc, pr = sequence_terms(model, batch, chunk_size)[:2]
        if reference is not None:
            rc, rr = (t.to(pc.device) for t in reference[b])
        else:
            with model.disable_adapter():
                rc, rr = sequence_terms(model, batch, chunk_size)[:2]
        margin = ((pc - rc) - (pr - rr))[:real].double().cpu()
        sums += torch.stack([(margin > 0).double().sum() + 0.5 * (margin == 0).double().sum(),
                             (pc > pr)[:real].double().sum().cpu(), (rc > rr)[:real].double().sum().cpu(),
                             (cfg.dpo.beta * margin).sum(), torch.tensor(float(real)),
                             torch.tensor(0.0)])
    model.train(was_training)
    sums = sums.to(device)
    dist.all_reduce(sums)  # every rank gets the totals
    sums = sums.cpu()
    n = sums[4].item()
    return {"pref_accuracy": sums[0].item() / n, "likelihood_accuracy": sums[1].item() / n,
            "ref_likelihood_accuracy": sums[2].item() / n, "reward_margin": sums[3].item() / n,
            "rows": int(n)}


def cfg_pad_id(model) -> int:
    cfg = model.config
    return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
