"""The loss zoo side by side: each loss against TRL, its shape against the margin, and a small
single-process LoRA run per loss type on the verifiable task (notebook 11).

The run is deliberately not `dpo_lab.dpo.trainer` (FSDP, 4-bit, ranks): one process, the fp32 SFT
model, constant learning rate, so that many losses x seeds fit in a smoke minute. Everything a run
logs uses TRL's metric names, plus the log-ratios log πθ − log π_ref of the batch's chosen and
rejected answers: the policy starts equal to the reference (LoRA's B = 0), so these ARE each
answer's log-prob drift since step 0.
"""
import torch

from dpo_lab.dpo.batching import BatchPlan, collate, concatenated_forward, encode_rows
from dpo_lab.dpo.loss import LOSS_TYPES, dpo_loss, dpo_metrics

# The loss types of each family, as the lesson groups them (sft is no preference loss; aot,
# aot_unpaired and sigmoid_norm are the sigmoid on sorted or length-averaged margins).
FAMILIES = {
    "sigmoid-like": ("sigmoid", "robust", "exo_pair", "discopop"),
    "squared": ("ipo", "sppo_hard"),
    "hinge": ("hinge",),
    "unpaired/anchored": ("bco_pair", "apo_zero", "apo_down", "nca_pair"),
}
EPS = {"robust": 0.1, "exo_pair": 1e-3}  # the losses whose shape needs ε > 0 to show (EXO's paper: 1e-3)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- against TRL ----------------------------------------------------------------------------------

def random_logps(pairs: int, length: int, seed: int):
    """Per-token log-probs (2B, T−1) of policy and reference, completion mask (2B, T), rows
    [chosen; rejected] with different prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * pairs,), generator=g)
    n = torch.randint(1, length - 4, (2 * pairs,), generator=g)
    pos = torch.arange(length)
    mask = (pos >= prompt[:, None]) & (pos < (prompt + n)[:, None])
    policy = -2 * torch.rand(2 * pairs, length - 1, generator=g)
    ref = (policy + 0.3 * torch.randn(2 * pairs, length - 1, generator=g)).clamp(max=0)
    return policy, ref, mask


def ours_vs_trl(trainer, loss_type: str, beta: float, pairs: int = 8, seed: int = 0) -> dict:
    """max |ours − TRL| of the loss and of its gradient w.r.t. the policy's per-token log-probs,
    TRL's `_compute_loss` run by `trl_check.trl_loss_on_logps` on the same random tensors."""
    from dpo_lab.dpo.trl_check import trl_loss_on_logps
    eps = EPS.get(loss_type, 0.0)
    policy, ref, mask = random_logps(pairs, 12, seed)
    p_trl, p_ours = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    want, _ = trl_loss_on_logps(trainer, p_trl, ref, mask, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want.backward()
    on = mask[:, 1:].to(policy.dtype)
    pc, pr = (p_ours * on).sum(-1).chunk(2)
    rc, rr = (ref * on).sum(-1).chunk(2)
    lc, lr = on.sum(-1).chunk(2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, chosen_lengths=lc, rejected_lengths=lr)
    losses.mean().backward()
    return {"loss": abs(losses.mean().item() - want.item()),
            "grad": (p_ours.grad - p_trl.grad).abs().max().item()}


# --- the shape of each loss -----------------------------------------------------------------------

def loss_and_weight(loss_type: str, margins: torch.Tensor, beta: float):
    """Loss and gradient weight −dL/dΔ along Δ = log-ratio margin, split evenly: chosen log-ratio
    +Δ/2, rejected −Δ/2 (the anchored losses also depend on where the pair sits, not only on Δ)."""
    delta = margins.detach().double().clone().requires_grad_()
    one = torch.ones_like(delta)
    losses, _, _ = dpo_loss(delta / 2, -delta / 2, 0 * one, 0 * one, beta, loss_type, EPS.get(loss_type, 0.0),
                            chosen_lengths=one, rejected_lengths=one)
    (grad,) = torch.autograd.grad(losses.sum(), delta)
    return losses.detach(), -grad


# --- the training experiment ----------------------------------------------------------------------

def lora_policy(model_dir, seed: int, r: int = 8, alpha: int = 16):
    """The SFT model with fresh LoRA adapters (B = 0: policy = reference at step 0)."""
    from peft import LoraConfig, get_peft_model

    from dpo_lab.models import load_model
    base, tok = load_model(model_dir)
    torch.manual_seed(seed)  # LoRA's A matrices
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model, tok


def _step_logps(model, batch):
    with torch.no_grad(), model.disable_adapter():  # the reference: same weights, adapters off
        rc, rr = concatenated_forward(model, batch)
    pc, pr = concatenated_forward(model, batch)
    return pc, pr, rc, rr


def train(model, tok, rows, loss_type, beta: float, steps: int, lr: float, batch_size: int, seed: int,
          max_length: int = 32, max_grad_norm: float = 1.0) -> list[dict]:
    """DPO-style training of the LoRA adapters with one loss type; returns one record per step,
    logged before that step's update (record 1: policy = reference)."""
    enc = encode_rows(tok, rows)
    plan = BatchPlan(len(rows), batch_size, 1, 1, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(steps):
        batch = collate([enc[i] for i in plan.global_indices(step)], tok.pad_token_id, max_length)
        pc, pr, rc, rr = _step_logps(model, batch)
        len_c, len_r = batch["loss_mask"][:, 1:].sum(-1).chunk(2)  # for the per-token means of ipo
        losses, cw, rw = dpo_loss(pc, pr, rc, rr, beta, loss_type, EPS.get(loss_type, 0.0),
                                  chosen_lengths=len_c, rejected_lengths=len_r)
        losses.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "grad_norm": grad_norm, **dpo_metrics(losses, cw, rw, pc, pr),
               "logratio/chosen": (pc - rc).mean().item(), "logratio/rejected": (pr - rr).mean().item()}
        history.append(rec)
    model.eval()
    return history


@torch.no_grad()
def held_out(model, tok, rows, max_length: int = 32, batch: int = 80) -> dict:
    """On held-out pairs: preference accuracy of the implicit reward (a tie counts half, so the
    reference scores 0.5), mean log-ratio of chosen and rejected answers, and generation success."""
    from dpo_lab.models import task_success
    enc = encode_rows(tok, rows)
    wins, lw, ll = 0.0, [], []
    for i in range(0, len(enc), batch):
        b = collate(enc[i:i + batch], tok.pad_token_id, max_length)
        pc, pr, rc, rr = _step_logps(model, b)
        m = (pc - rc) - (pr - rr)
        wins += (m > 0).sum().item() + 0.5 * (m == 0).sum().item()
        lw.append(pc - rc)
        ll.append(pr - rr)
    return {"pref_accuracy": wins / len(enc), "logratio_chosen": torch.cat(lw).mean().item(),
            "logratio_rejected": torch.cat(ll).mean().item(), "task_success": task_success(model, tok, rows)}


def run(model_dir, loss_type: str, beta: float, seed: int, rows, eval_rows, **train_kw) -> dict:
    """One loss type, one seed: train, then evaluate on the held-out rows."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    model, tok = lora_policy(model_dir, seed)
    history = train(model, tok, rows, loss_type, beta, seed=seed, **train_kw)
    return {"loss_type": loss_type, "seed": seed, "beta": beta, "history": history,
            **held_out(model, tok, eval_rows)}
