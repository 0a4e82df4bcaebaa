"""Evaluate a DPO run on the held-out split of the verifiable task, in one process.

The trained adapter is loaded the way a user would load it (PeftModel.from_pretrained on the
4-bit base), so this also checks that the saved adapter is a valid PEFT adapter. "Before" is the
same model with the adapter disabled, i.e. the SFT model.
"""
import torch

from dpo_lab.dpo.batching import collate, concatenated_forward, encode_rows
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
