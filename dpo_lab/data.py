"""Preference data: load it in the formats users bring, and refuse bad rows by name.

Two formats, as in TRL:
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, a message
                   being {"role": str, "content": str}; rendered to strings with the tokenizer's
                   chat template (the completion is what the template adds after the prompt).

Sources: "arith" (the task shipped in data/arith/), a local .json / .jsonl / .parquet file, or a
Hugging Face dataset name (needs `datasets` and internet).

Every row is checked. A bad row raises an InvalidRowError subclass whose message names the row
index and the problem; with drop_invalid=True such rows are dropped and counted instead.
Nothing is stripped, truncated or otherwise mangled.
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dpo_lab.paths import DATA_DIR

FIELDS = ("prompt", "chosen", "rejected")
SHIPPED = {"arith": DATA_DIR / "arith"}


class InvalidRowError(ValueError):
    problem = "invalid row"

    def __init__(self, index: int, detail: str):
        self.index, self.detail = index, detail
        super().__init__(f"row {index}: {self.problem}: {detail}")


class MissingFieldError(InvalidRowError):
    problem = "missing field"


class NotAStringError(InvalidRowError):
    problem = "not a string"


class BadMessageError(InvalidRowError):
    problem = "bad message"


class EmptyCompletionError(InvalidRowError):
    problem = "empty completion"


class IdenticalCompletionsError(InvalidRowError):
    problem = "chosen identical to rejected"


class TooLongError(InvalidRowError):
    problem = "too long"


@dataclass
class PreferenceData:
    rows: list[dict]                               # {"prompt", "chosen", "rejected"} strings
    dropped: Counter = field(default_factory=Counter)  # problem -> rows dropped
    source: str = ""

    def __len__(self):
        return len(self.rows)

    def __repr__(self):
        extra = f", dropped {dict(self.dropped)}" if self.dropped else ""
        return f"PreferenceData({len(self.rows)} rows from {self.source!r}{extra})"


def read_records(source, split: str = "train") -> list[dict]:
    """Raw rows from a shipped name, a local file, or a Hugging Face dataset name."""
    if str(source) in SHIPPED:
        path = SHIPPED[str(source)] / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"shipped dataset {source!r} has no split {split!r} ({path})")
        return read_records(path)
    path = Path(source)
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"no such data file: {path}")
        if path.suffix == ".jsonl":
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            return data
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    from datasets import load_dataset  # a Hugging Face dataset name
    return list(load_dataset(str(source), split=split))


def _check_messages(index, name, messages):
    if not isinstance(messages, list) or not messages:
        raise BadMessageError(index, f"{name!r} must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadMessageError(index, f"{name}[{k}] must be {{'role': str, 'content': str}}, got {m!r}")


def _render_conversational(index, row, tokenizer):
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"row {index} is conversational: pass a tokenizer with a chat template")
    for name in FIELDS:
        _check_messages(index, name, row[name])
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    out = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=False)
        if not full.startswith(prompt):
            raise BadMessageError(index, f"the chat template does not render {name!r} as a continuation of the prompt")
        out[name] = full[len(prompt):]
    return out


def validate_row(index: int, row, tokenizer=None, max_length: int | None = None) -> dict:
    """The row as {"prompt", "chosen", "rejected"} strings, or an InvalidRowError naming the problem."""
    if not isinstance(row, dict):
        raise InvalidRowError(index, f"expected an object with {FIELDS}, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row or row[name] is None:
            raise MissingFieldError(index, f"{name!r}")
    if all(isinstance(row[n], list) for n in FIELDS):
        row = _render_conversational(index, row, tokenizer)
    for name in FIELDS:
        if not isinstance(row[name], str):
            raise NotAStringError(index, f"{name!r} is {type(row[name]).__name__}")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            raise EmptyCompletionError(index, f"{name!r} is empty")
    if row["chosen"] == row["rejected"]:
        raise IdenticalCompletionsError(index, f"both are {row['chosen'][:40]!r}")
    if max_length is not None:
        count = (lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])) if tokenizer else len
        unit = "tokens" if tokenizer else "characters"
        longest = max(count(row["prompt"]) + count(row[n]) for n in ("chosen", "rejected"))
        if longest > max_length:
            raise TooLongError(index, f"{longest} {unit} > max_length {max_length}")
    return {name: row[name] for name in FIELDS}


def load_preferences(source, *, split: str = "train", tokenizer=None, max_length: int | None = None,
                     drop_invalid: bool = False) -> PreferenceData:
    """Load and validate preference rows; see the module docstring."""
    data = PreferenceData([], Counter(), str(source))
    for i, raw in enumerate(read_records(source, split)):
        try:
            data.rows.append(validate_row(i, raw, tokenizer, max_length))
        except InvalidRowError as e:
            if not drop_invalid:
                raise
            data.dropped[e.problem] += 1
    if not data.rows:
        raise ValueError(f"{source!r} ({split}) has no valid rows; dropped: {dict(data.dropped)}")
    return data
