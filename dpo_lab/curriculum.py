"""Curriculum samplers: which training rows each step sees, and in what order.

- `RandomOrder`: every row is equally likely at every step (the baseline).
- `EasyToHard(scores, pacing)`: curriculum learning (Bengio et al. 2009) with a pacing function
  (Wu et al. 2021): at step t only the easiest fraction `pacing(t)` of the rows, sorted by a
  difficulty score, can be drawn; the fraction grows to 1.
- `LengthWarmup(start_len, end_len, warmup_steps)`: sequence-length warm-up (Li et al. 2022): the
  longest sequence allowed grows linearly from start_len to end_len tokens.

Each sampler is an iterator of batches (lists of row indices), seeded. A batch is filled with rows
up to `tokens_per_batch` tokens, so every arm takes the same number of steps for the same token
budget (and the same learning-rate schedule); `tokens_seen` counts the tokens served so far.
A training loop takes one as `models.train_sft(..., sampler=...)`.
"""
import math
import random


def linear_pacing(start: float, full_at: int):
    """Fraction of the sorted pool open at step t: `start` at t=0, rising linearly to 1 at `full_at`."""
    _check_pacing(start, full_at)
    return lambda step: min(1.0, start + (1 - start) * step / full_at)


def root_pacing(start: float, full_at: int):
    """Like linear_pacing but rising as sqrt(t / full_at): fast at first, slower near the end."""
    _check_pacing(start, full_at)
    return lambda step: min(1.0, start + (1 - start) * math.sqrt(min(step, full_at) / full_at))


def _check_pacing(start, full_at):
    if not 0 < start <= 1:
        raise ValueError(f"pacing start must be in (0, 1], got {start!r}")
    if full_at < 1:
        raise ValueError(f"pacing full_at must be a step >= 1, got {full_at!r}")


class RandomOrder:
    """Rows drawn uniformly from the whole pool at every step."""

    def __init__(self, lengths, tokens_per_batch: int, seed: int = 0):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("lengths is empty: a sampler needs at least one row")
        if tokens_per_batch < max(self.lengths):
            raise ValueError(f"tokens_per_batch={tokens_per_batch} is below the longest row "
                             f"({max(self.lengths)} tokens)")
        self.tokens_per_batch = tokens_per_batch
        self.rng = random.Random(seed)
        self.step = 0
        self.tokens_seen = 0

    def available(self, step: int) -> list[int]:
        """Row indices that step `step` may draw from."""
        return range(len(self.lengths))

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        pool = self.available(self.step)
        if not pool:
            raise RuntimeError(f"no row is available at step {self.step}")
        batch, tokens = [], 0
        while True:
            i = pool[self.rng.randrange(len(pool))]
            if tokens + self.lengths[i] > self.tokens_per_batch:
                break  # full: the budget per step, not the row count, is what arms share
            batch.append(i)
            tokens += self.lengths[i]
        self.step += 1
        self.tokens_seen += tokens
        return batch


class EasyToHard(RandomOrder):
    """Rows drawn uniformly from the easiest `pacing(step)` fraction of the pool (ties in random order)."""

    def __init__(self, lengths, scores, pacing, tokens_per_batch: int, seed: int = 0):
        super().__init__(lengths, tokens_per_batch, seed)
        if len(scores) != len(self.lengths):
            raise ValueError(f"{len(scores)} scores for {len(self.lengths)} rows")
        order = list(range(len(scores)))
        random.Random(seed).shuffle(order)  # ties: no bias from the rows' original order
        self.order = sorted(order, key=lambda i: scores[i])
        self.pacing = pacing

    def available(self, step: int) -> list[int]:
        return self.order[:max(1, math.ceil(self.pacing(step) * len(self.order)))]


class LengthWarmup(RandomOrder):
    """Rows drawn uniformly from those no longer than `max_len(step)` tokens."""

    def __init__(self, lengths, start_len: int, end_len: int, warmup_steps: int,
                 tokens_per_batch: int, seed: int = 0):
        super().__init__(lengths, tokens_per_batch, seed)
        if start_len < min(self.lengths):
            raise ValueError(f"start_len={start_len} is below the shortest row ({min(self.lengths)} tokens)")
        if end_len < max(self.lengths):
            raise ValueError(f"end_len={end_len} would never serve the longest rows ({max(self.lengths)} tokens)")
        if end_len < start_len or warmup_steps < 1:
            raise ValueError(f"need start_len <= end_len and warmup_steps >= 1, got "
                             f"{start_len}, {end_len}, {warmup_steps}")
        self.start_len, self.end_len, self.warmup_steps = start_len, end_len, warmup_steps
        self.by_length = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])

    def max_len(self, step: int) -> int:
        """Li et al. 2022's linear schedule, rounded down to whole tokens."""
        frac = min(1.0, step / self.warmup_steps)
        return int(self.start_len + (self.end_len - self.start_len) * frac)

    def available(self, step: int) -> list[int]:
        cap = self.max_len(step)
        return [i for i in self.by_length if self.lengths[i] <= cap]


# --- one arm of the comparison ---------------------------------------------------------------

# Smaller than models.TINY: the comparison trains 3 arms x several seeds from scratch on a CPU.
SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2)


def row_lengths(tokenizer, rows) -> list[int]:
    """Tokens of prompt + completion + EOS per row: what a batch of these rows costs."""
    from dpo_lab.models import encode_sft
    return [len(ids) for ids in encode_sft(tokenizer, rows)[0]]


def train_arm(sampler, rows, test_rows, steps: int, eval_every: int, seed: int, lr: float = 3e-3,
              warmup: int = 30, **model_overrides) -> dict:
    """Train a fresh small model with `sampler`'s batches; held-out success against tokens seen."""
    from dpo_lab.models import build_tiny_model, build_tokenizer, task_success, train_sft
    tokenizer = build_tokenizer()
    model = build_tiny_model(seed=seed, **dict(SMALL, **model_overrides))
    curve = {"step": [0], "tokens": [0], "success": [task_success(model, tokenizer, test_rows, 4)]}

    def evaluate(step, model):
        if step % eval_every == 0 or step == steps:
            curve["step"].append(step)
            curve["tokens"].append(sampler.tokens_seen)
            curve["success"].append(task_success(model, tokenizer, test_rows, 4))

    curve["losses"] = train_sft(model, tokenizer, rows, steps, None, lr, warmup, seed, progress=False,
                                sampler=sampler, on_step=evaluate)
    return curve
