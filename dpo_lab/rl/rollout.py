"""Rollouts for GRPO: G sampled completions per prompt, decoded with a KV cache, scored by a checker.

Sampling draws from a `torch.Generator` seeded per (seed, step, prompt), and each prompt's group is
decoded as its own batch of G rows, so a prompt's completions are the same bits whichever rank or
batch it lands in: that is what lets a 2-rank run equal the 1-rank run.

The KV cache (Pope et al. 2022, "Efficiently Scaling Transformer Inference") keeps each layer's
keys and values of the tokens seen so far, so each new token costs one position's forward instead of
the whole prefix again; `decode(..., use_cache=False)` is the slow twin it is tested against.
"""
import re
from dataclasses import dataclass

import torch

from dpo_lab import task


# --- checkers: the verifiable reward ------------------------------------------------------------

def exact(prompt: str, completion: str) -> bool:
    """The task's checker: the first line is exactly the sum."""
    return task.is_correct(prompt, completion)


def contains(prompt: str, completion: str) -> bool:
    """A deliberately loose checker: accepts if the sum appears among the numbers of the first line,
    so "32 42" passes for 37+5 — hedging between the carry and the dropped carry is rewarded."""
    a, b = task.parse_prompt(prompt)
    first = completion.strip().split("\n")[0]
    return task.answer(a, b) in re.findall(r"\d+", first)


def prefix(prompt: str, completion: str) -> bool:
    """Another loose checker: accepts if the first line *starts* with the sum ("427" passes for 42)."""
    a, b = task.parse_prompt(prompt)
    return completion.strip().split("\n")[0].startswith(task.answer(a, b))


def units(prompt: str, completion: str) -> bool:
    """A loose checker the SFT model can already exploit: only the units digit is checked, so the
    demonstrator's dropped carry (37+5 -> "32") earns full reward. Seen (40 steps, lr 1e-4, 8×8):
    mean reward 0.97 -> 0.94 while greedy exact success stays at 0.66 (0.66 -> 0.94 with `exact`):
    the groups have almost no reward spread, so GRPO has nothing to push on."""
    a, b = task.parse_prompt(prompt)
    first = completion.strip().split("\n")[0].strip()
    return first.isdigit() and first[-1] == task.answer(a, b)[-1]


CHECKERS = {"exact": exact, "contains": contains, "prefix": prefix, "units": units}


# --- decoding with a KV cache -------------------------------------------------------------------

def sample_seed(seed: int, step: int, prompt_index: int) -> int:
    """One generator seed per (run seed, step, global prompt index): independent of the rank layout."""
    return (seed * 1_000_003 + step) * 1_000_003 + prompt_index


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
           generator: torch.Generator | None = None, temperature: float = 1.0, use_cache: bool = True):
    """Completions (R, ≤max_new_tokens) of R copies of one prompt (R, P) (no padding needed),
    greedy if `generator` is None else sampled at `temperature`. Finished rows get `pad_token_id`
    after their EOS. Returns (completion_ids, completion_mask): the mask covers up to and with EOS."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (use generator=None for greedy)")
    ids, past, new = prompt_ids, None, []
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if use_cache:
            out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(input_ids=ids, use_cache=False)
        logits = out.logits[:, -1].float()
        if generator is None:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        new.append(tok)
        done |= tok == eos_token_id
        ids = torch.cat([ids, tok[:, None]], 1)
        if done.all():
            break
    completion = torch.stack(new, 1)
    # a token is part of the completion if no EOS came strictly before it
    eos_before = torch.cumsum((completion == eos_token_id).long(), 1) - (completion == eos_token_id).long()
    return completion, (eos_before == 0).long()


# --- a batch of groups --------------------------------------------------------------------------

@dataclass
class Rollout:
    """N prompts × G completions, row i·G+j is prompt i's j-th sample; right-padded to C tokens."""
    prompts: list            # (N·G,) each prompt repeated G times
    completions: list        # (N·G,) decoded text, special tokens stripped
    prompt_ids: torch.Tensor       # (N·G, P)
    completion_ids: torch.Tensor   # (N·G, C)
    completion_mask: torch.Tensor  # (N·G, C), 1 up to and with EOS
    rewards: torch.Tensor          # (N·G,)


def rollout(model, tokenizer, prompts, G: int, *, seed: int, step: int, first_index: int = 0,
            max_new_tokens: int = 6, temperature: float = 1.0, checker=exact,
            mask_truncated: bool = False) -> Rollout:
    """G samples for each prompt; prompt k's generator is `sample_seed(seed, step, first_index + k)`
    (`first_index` = the global index of prompts[0]). Rewards are 1.0 where `checker` accepts.
    `mask_truncated` (DAPO's overlong filtering, Yu et al. 2025; TRL's mask_truncated_completions): a
    completion cut at `max_new_tokens` gets an all-zero mask, so it adds no token to the loss; as TRL,
    a completion is cut when its last token is neither EOS nor padding."""
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    if len(lengths) != 1:  # the task's prompts are all "ab+c=": one length, no padding inside a batch
        raise ValueError(f"prompts of token lengths {sorted(lengths)}: rollout needs one length")
    was_training = model.training
    model.eval()
    rows, comps = [], []
    for k, p in enumerate(prompts):
        pid = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]] * G)
        gen = torch.Generator().manual_seed(sample_seed(seed, step, first_index + k))
        c, m = decode(model, pid, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, gen, temperature)
        rows.append((pid, c, m))
    model.train(was_training)
    width = max(c.shape[1] for _, c, _ in rows)
    pad = tokenizer.pad_token_id
    cids = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad) for _, c, _ in rows])
    cmask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1]), value=0) for _, _, m in rows])
    if mask_truncated:
        last = cids.gather(1, (cmask.sum(1, keepdim=True) - 1).clamp(min=0))
        cmask = cmask * ((last == tokenizer.eos_token_id) | (last == pad)).long()
    texts = tokenizer.batch_decode(cids, skip_special_tokens=True)
    all_prompts = [p for p in prompts for _ in range(G)]
    rewards = torch.tensor([float(checker(p, t)) for p, t in zip(all_prompts, texts)])
    return Rollout(all_prompts, texts, torch.cat([pid for pid, _, _ in rows]), cids, cmask, rewards)


def token_logps_and_entropy(model, prompt_ids, completion_ids, completion_mask):
    """Per-token log π(o_t | prompt, o_<t) and the entropy of π at each completion position, (B, C).
    Positions after EOS are fed as pad tokens and masked out by the caller."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, prompt_ids.shape[1] - 1:-1].float()
    logp_all = logits.log_softmax(-1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy
