"""Tiny causal LMs built offline, their tokenizer, SFT on the task, and loading real models.

`build_tokenizer()` is a character-level `transformers` tokenizer made here (no download);
`build_tiny_model()` a Qwen2- or Llama-architecture model from a config. `sft_model_dir()`
trains the tiny model briefly on the flawed demonstrations of `dpo_lab.task` and caches it,
so every later notebook starts from the same SFT model. `load_model()` takes the same path or
a Hugging Face model name (for users with internet).
"""
import hashlib
import json
import math
import os
import shutil
import string
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from dpo_lab import task
from dpo_lab.paths import cache_dir

SPECIAL = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
# A minimal chat format: each message is "<|role|>content\n"; generation continues after <|assistant|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: one token per printable ASCII character, plus special and role tokens."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), *ROLES])}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL["unk_token"]))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL, padding_side="left",
                                  additional_special_tokens=ROLES)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "qwen2", vocab_size: int | None = None, **overrides):
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; have {sorted(ARCHS)}")
    tok = build_tokenizer()
    cfg = dict(TINY, vocab_size=vocab_size or len(tok), pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               tie_word_embeddings=True)
    cfg.update(overrides)
    return ARCHS[arch][0](**cfg)


def build_tiny_model(arch: str = "qwen2", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return ARCHS[arch][1](tiny_config(arch, **overrides))


def load_model(name_or_path, dtype=None, quantization_config=None, trust_remote_code=False, **kwargs):
    """A causal LM and its tokenizer from a local directory or a Hugging Face model name."""
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, quantization_config=quantization_config,
        trust_remote_code=trust_remote_code, **kwargs)
    if getattr(quantization_config, "load_in_4bit", False):
        from dpo_lab.dpo.qlora import one_kernel_path
        one_kernel_path(model)  # policy and reference must run the same 4-bit kernel
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- SFT on the task -------------------------------------------------------------------------

SFT_DEFAULTS = dict(arch="qwen2", steps=1200, batch_size=64, lr=1e-3, weight_decay=0.1, warmup=100, seed=0)


def encode_sft(tokenizer, rows):
    """Token ids of prompt + completion + EOS, and a mask that is 1 on completion tokens only."""
    ids, masks = [], []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    return ids, masks


def _pad(seqs, value):
    width = max(map(len, seqs))
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs])


def train_sft(model, tokenizer, rows, steps, batch_size, lr, warmup, seed, weight_decay=0.1, progress=True,
              sampler=None, on_step=None):
    """Plain supervised fine-tuning: cross-entropy on completion tokens, AdamW, cosine decay.

    `sampler` (an iterator of lists of row indices, e.g. a `dpo_lab.curriculum` sampler) replaces
    the uniform draws of batch_size rows; `on_step(step, model)` runs after each update (evaluation).
    """
    from tqdm.auto import tqdm
    ids, masks = encode_sft(tokenizer, rows)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="SFT", disable=not progress, mininterval=2)
    for step in bar:
        if sampler is not None:
            idx = next(sampler)
        else:
            idx = torch.randint(len(ids), (batch_size,), generator=gen).tolist()
        x = _pad([ids[i] for i in idx], tokenizer.pad_token_id)
        m = _pad([masks[i] for i in idx], 0)
        attn = _pad([[1] * len(ids[i]) for i in idx], 0)
        labels = x.masked_fill(m == 0, -100)
        loss = model(input_ids=x, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, model)
            model.train()  # the callback may have switched to eval mode to generate
    model.eval()
    return losses


def sft_model_dir(steps: int | None = None, progress: bool = True, **overrides) -> Path:
    """The SFT tiny model's directory in the cache, trained on first use (about a minute on a CPU).

    Keyed by the training settings and the data, so changing either trains a new one.
    """
    settings = dict(SFT_DEFAULTS, **overrides, **({"steps": steps} if steps else {}))
    data_file = task.TASK_DIR / "sft.jsonl"
    key = json.dumps(settings, sort_keys=True) + hashlib.sha256(data_file.read_bytes()).hexdigest()
    out = cache_dir() / "models" / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "sft_log.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        # One process trains, the others (pytest workers, notebooks run side by side) wait for it.
        if fcntl is not None:  # POSIX; elsewhere two first runs may both train, harmlessly
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "sft_log.json").exists():
            return out
        return _train_sft_into(out, settings, data_file, progress)


def _train_sft_into(out: Path, settings: dict, data_file: Path, progress: bool) -> Path:
    tokenizer = build_tokenizer()
    model = build_tiny_model(settings["arch"], seed=settings["seed"])
    torch.manual_seed(settings["seed"])
    losses = train_sft(model, tokenizer, task.read_jsonl(data_file), settings["steps"],
                       settings["batch_size"], settings["lr"], settings["warmup"], settings["seed"],
                       settings["weight_decay"], progress)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "sft_log.json").write_text(json.dumps({"settings": settings, "losses": losses}))
    if out.exists():  # left by a run killed before it wrote sft_log.json
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-written model is never picked up
    return out


# --- generation and the task's success rate --------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 8, batch_size: int = 256) -> list[str]:
    """Greedy completions (special tokens stripped), batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False, padding_side="left").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def task_success(model, tokenizer, rows, max_new_tokens: int = 8) -> float:
    """Fraction of prompts whose greedy completion the task's checker accepts."""
    prompts = [r["prompt"] for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens)
    return sum(task.is_correct(p, c) for p, c in zip(prompts, completions)) / len(prompts)
