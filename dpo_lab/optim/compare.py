"""Optimizers side by side on the tiny transformer of dpo_lab.arch (notebook 12).

Pre-training runs (AdamW vs Muon, AdamW vs GaLore) train from scratch on the Markov task; the
fine-tuning runs (full, LoRA, LISA) start from a model pre-trained on one Markov chain and adapt it to
another chain, all at the same steps, batches and learning rate. Losses are scored on a fixed clean
batch of the task being trained.
"""

import torch
from tqdm.auto import tqdm

from dpo_lab.arch.toy_tasks import MarkovTask, lm_loss
from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.optim.adamw import AdamW
from dpo_lab.optim.galore import GaLoreAdamW
from dpo_lab.optim.lisa import LISA
from dpo_lab.optim.muon import Muon
from dpo_lab.optim.state_bytes import state_bytes
from dpo_lab.runtime import quiet_stderr

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down"]


def tiny(seed: int, n_layers: int = 2, dim: int = 32, vocab: int = 64) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4)


def hidden_matrices(model):
    """The 2-D weights inside the blocks (Muon's and GaLore's); the rest (embeddings, head, norms,
    biases) stays with AdamW, as Jordan and the GaLore paper do."""
    hidden = [p for b in model.blocks for p in b.parameters() if p.ndim == 2]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in ids]


def make_optimizers(kind: str, model, lr: float, muon_lr: float | None = None, rank: int = 8,
                    gap: int = 20, scale: float = 0.25):
    hidden, rest = hidden_matrices(model)
    if kind == "adamw":
        return [AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    if kind == "muon":
        return [Muon(hidden, lr=muon_lr, weight_decay=0.0), AdamW(rest, lr=lr, weight_decay=0.0)]
    if kind == "galore":
        return [GaLoreAdamW([{"params": rest}, {"params": hidden, "rank": rank, "update_proj_gap": gap,
                                                "scale": scale}], lr=lr)]
    raise ValueError(f"unknown optimizer kind {kind!r}; have adamw, muon, galore")


def train(model, optimizers, task, steps: int, seed: int, batch_size=16, seq_len=32, lisa=None,
          desc="train", progress=False) -> list[float]:
    """Returns the clean-batch loss after each step."""
    g = torch.Generator().manual_seed(seed)
    clean = task.batch(64, seq_len, torch.Generator().manual_seed(seed + 10**6))
    params = [p for p in model.parameters()]
    curve = []
    for step in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        if lisa is not None:
            lisa.step(step, optimizers[0])
        loss = lm_loss(model, *task.batch(batch_size, seq_len, g))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        with torch.no_grad():
            curve.append(lm_loss(model, *clean).item())
    del params
    return curve


def pretrain(kind, lr, seed, steps, muon_lr=None, rank=8, gap=20):
    model = tiny(seed)
    opts = make_optimizers(kind, model, lr, muon_lr=muon_lr, rank=rank, gap=gap)
    curve = train(model, opts, MarkovTask(64, seed=seed), steps, seed)
    return {"curve": curve, "final": curve[-1], "state_bytes": sum(state_bytes(o) for o in opts)}


def lr_sweep(kind, lrs, seeds, steps, progress=True, **kw):
    """{lr: [final clean loss per seed]}; for Muon the sweep is over Muon's lr (AdamW's stays at kw["lr"])."""
    out = {}
    for lr in tqdm(lrs, desc=f"{kind} lr sweep", disable=not progress):
        args = dict(kw, muon_lr=lr) if kind == "muon" else dict(kw, lr=lr)
        out[lr] = [pretrain(kind, seed=s, steps=steps, **args)["final"] for s in seeds]
    return out


def base_model(seed: int, steps: int, n_layers: int = 4, lr: float = 1e-2) -> dict:
    """A model pre-trained on chain `seed` (the starting point of every fine-tuning run)."""
    model = tiny(seed, n_layers=n_layers)
    train(model, [AdamW(model.parameters(), lr=lr, weight_decay=0.0)], MarkovTask(64, seed=seed), steps, seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def finetune(method: str, base: dict, task_seed: int, seed: int, steps: int, lr: float,
             n_layers: int = 4, gamma: int = 1, interval: int = 5, rank: int = 4) -> dict:
    """Fine-tune the base model on chain `task_seed` with "full", "lora" or "lisa"."""
    model = tiny(0, n_layers=n_layers)
    model.load_state_dict(base)
    torch.manual_seed(seed)
    lisa = None
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "lisa":
        lisa = LISA(model, gamma=gamma, interval=interval, seed=seed)
        params = list(model.parameters())
    elif method == "full":
        params = list(model.parameters())
    else:
        raise ValueError(f"unknown fine-tuning method {method!r}; have full, lora, lisa")
    opt = AdamW(params, lr=lr, weight_decay=0.0)
    curve = train(model, [opt], MarkovTask(64, seed=task_seed), steps, seed, lisa=lisa)
    return {"curve": curve, "final": curve[-1], "state_bytes": state_bytes(opt), "model": model,
            "lisa": lisa}


def galore_twins(steps: int, seed: int, rank: int = 4, gap: int = 5, lr: float = 1e-2) -> float:
    """Ours vs galore_torch.GaLoreAdamW on the same tiny model, batches and steps (with refreshes
    every `gap`); returns the max |θ_ours − θ_ref| over all steps."""
    import warnings
    with quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW as RefGaLore
    task = MarkovTask(64, seed=seed)
    models = [tiny(seed), tiny(seed)]
    groups = []
    for m in models:
        hidden, rest = hidden_matrices(m)
        groups.append([{"params": rest}, {"params": hidden, "rank": rank, "update_proj_gap": gap,
                                          "scale": 0.25, "proj_type": "std"}])
    opts = [GaLoreAdamW(groups[0], lr=lr), RefGaLore(groups[1], lr=lr, no_deprecation_warning=True)]
    gens = [torch.Generator().manual_seed(seed) for _ in models]
    worst = 0.0
    for _ in range(steps):
        for m, o, g in zip(models, opts, gens):
            o.zero_grad()
            lm_loss(m, *task.batch(16, 32, g)).backward()
            o.step()
        worst = max(worst, max((p - q).abs().max().item()
                               for p, q in zip(models[0].parameters(), models[1].parameters())))
    return worst
