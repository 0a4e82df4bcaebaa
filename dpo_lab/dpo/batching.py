"""Preference rows -> token ids -> padded micro-batches, and the one concatenated forward.

Conventions (the same as TRL's DPOTrainer, so both see identical batches):
- completions end with EOS (added when the row's text lacks it); the completion starts where the
  tokenised prompt and prompt+completion diverge;
- sequences longer than `max_length` keep their start;
- chosen and rejected are stacked along the batch, [chosen_0..chosen_B, rejected_0..rejected_B],
  right-padded, and go through ONE forward; `loss_mask` is 1 on completion tokens only.
"""
from dataclasses import dataclass

import torch


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, row: dict) -> dict:
    """{'prompt','chosen','rejected'} strings -> prompt_ids, chosen_ids, rejected_ids."""
    eos = tokenizer.eos_token
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
    rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
    p, pc, pr = enc(row["prompt"]), enc(row["prompt"] + chosen), enc(row["prompt"] + rejected)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def encode_rows(tokenizer, rows: list[dict]) -> list[dict]:
    return [encode_pair(tokenizer, r) for r in rows]


def collate(examples: list[dict], pad_id: int, max_length: int | None = None) -> dict:
    """Encoded pairs -> {'input_ids','attention_mask','loss_mask'} of shape (2B, T), chosen first."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = ex["prompt_ids"] + ex[key]
            m = [0] * len(ex["prompt_ids"]) + [1] * len(ex[key])
            if max_length is not None:
                ids, m = ids[:max_length], m[:max_length]
            seqs.append(ids)
            masks.append(m)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def layout(examples: list[dict], pad_id: int, data) -> dict:
    """Encoded pairs -> a micro-batch in the layout `data` (the config's DataConfig) asks for:
    packed rows without padding (`packing.pack`, data.packing; rows of data.max_tokens_per_row,
    or of data.max_length when that is None) or `collate`'s padded rows."""
    from dpo_lab.dpo.packing import pack
    if data.packing:
        # max_tokens_per_row None = rows of max_length tokens: attention costs L² per row, so ONE
        # row of all 2B sequences costs (Σ lengths)² (its step took 1.3x the padded step's CPU time
        # at `bench dpo`'s tiny config), rows of max_length at most the padded batch's, no padding
        return pack(examples, data.max_tokens_per_row or data.max_length, data.max_length, pad_id)
    return collate(examples, pad_id, data.max_length)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def real_tokens(batch: dict) -> int:
    """Tokens of the sequences themselves, not padding or packed-row filler (for tokens/s)."""
    if "real_tokens" in batch:  # packing.pack counts them
        return int(batch["real_tokens"])
    return int(batch["attention_mask"].sum())


def concatenated_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [chosen; rejected]; returns (chosen_logps, rejected_logps), each (B,),
    the SUM of completion-token log-probs (the DPO paper's and TRL's convention)."""
    from dpo_lab.dpo.loss import sequence_logps
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    logps = sequence_logps(logits.float(), batch["input_ids"], batch["loss_mask"])
    return logps.chunk(2)


@dataclass
class BatchPlan:
    """Which rows each rank sees at each step: a seeded permutation per epoch, cut into global
    batches of micro_batch * grad_accum * world_size pairs. Rank r takes micro-batches
    r*grad_accum ... r*grad_accum + grad_accum - 1 of the global batch, so 1 rank with 2x the
    accumulation sees exactly the same global batch as 2 ranks."""
    n_rows: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.global_batch

    def __post_init__(self):
        if self.n_rows < self.global_batch:
            raise ValueError(f"{self.n_rows} rows cannot fill one global batch of {self.global_batch} "
                             f"(micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x "
                             f"world_size {self.world_size})")

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()

    def global_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._perm(epoch)[start:start + self.global_batch]

    def micro_indices(self, step: int, rank: int) -> list[list[int]]:
        idx = self.global_indices(step)
        chunks = [idx[i:i + self.micro_batch] for i in range(0, len(idx), self.micro_batch)]
        return chunks[rank * self.grad_accum:(rank + 1) * self.grad_accum]


class EncodedRows:
    """Rows tokenised on first use: a run touches steps x global batch rows, not all of them."""

    def __init__(self, tokenizer, rows):
        self.tokenizer, self.rows, self.cache = tokenizer, rows, {}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = encode_pair(self.tokenizer, self.rows[i])
        return self.cache[i]
