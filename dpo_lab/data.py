"""Preference data: load it in the formats users bring, and refuse bad rows by name.

Two formats, as in TRL:
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, a message
                   being {"role": str, "content": str}; rendered to strings with the tokenizer's
                   chat template (the completion is what the template adds after the prompt).

Sources: "arith" (the task shipped in data/arith/), a local .json / .jsonl / .parquet file (suffix
in any case), or a Hugging Face dataset name (needs `datasets` and internet). A source that looks
like a path (starts with / . ~, has a data suffix, or more than one "/") and does not exist is
"no such file" at once, never a Hub lookup; a directory is refused by name.

Files are read as UTF-8 whatever the locale; a UTF-8 byte-order mark is accepted.

Every row is checked. A bad row raises an InvalidRowError subclass whose message names the file and
place ("f.jsonl, line 7": 1-based file lines, blank lines counted; "f.parquet, row 3": 0-based rows)
and the problem; a JSONL line that is not JSON or not UTF-8 is a bad row too. With
drop_invalid=True such rows are dropped and counted instead. A file that cannot be read at all
(malformed .json, JSON Lines saved as .json, not Parquet) raises DataFileError naming file and line.
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

    def __init__(self, index: int, detail: str, where: str | None = None):
        self.index, self.detail, self.where = index, detail, where or f"row {index}"
        super().__init__(f"{self.where}: {self.problem}: {detail}")


class MalformedLineError(InvalidRowError):
    problem = "malformed JSON line"


class InvalidUTF8Error(MalformedLineError):
    problem = "invalid UTF-8"


class DataFileError(ValueError):
    """A whole file that cannot be read as rows (not one bad row); names the file and line."""


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


READERS = (".jsonl", ".json", ".parquet")
# Suffixes that mark a source as a local file, so that a typo is "no such file" at once rather
# than a 24 s round trip to the Hugging Face Hub.
LOCAL_SUFFIXES = READERS + (".csv", ".tsv", ".txt", ".arrow", ".gz")


def _raise(e):
    raise e


def _looks_local(text: str) -> bool:
    # Hub ids are "name" or "owner/name": more slashes, a backslash or a leading / . ~ mean a path.
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
            or any(text.lower().endswith(s) for s in LOCAL_SUFFIXES))


def _read_jsonl(path: Path, on_bad) -> list:
    """(line number, where, object) per non-blank line; line numbers are 1-based and count blank
    lines, as an editor does. Bytes are decoded here, so the locale never matters."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}, line {n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")  # a BOM may open the file
            except UnicodeDecodeError as e:
                on_bad(InvalidUTF8Error(n, f"byte {raw[e.start]:#04x} at column {e.start + 1}", where))
                continue
            if not text.strip():
                continue
            try:
                out.append((n, where, json.loads(text)))
            except json.JSONDecodeError as e:
                on_bad(MalformedLineError(n, f"{e.msg} at column {e.colno}: {text.strip()[:60]!r}", where))
    return out


def _read_json(path: Path) -> list:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFileError(f"{path}, line {line}: invalid UTF-8 (byte {raw[e.start]:#04x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a second value after the first: one object per line
            raise DataFileError(f"{path}, line {e.lineno}: a second JSON value after the first; this "
                                f"looks like JSON Lines (one object per line): rename it to .jsonl") from None
        raise DataFileError(f"{path}, line {e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return [(i, f"{path}, row {i}", row) for i, row in enumerate(data)]


def _read_parquet(path: Path) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as e:
        raise DataFileError(f"{path}: not a readable Parquet file: {e}") from None
    return [(i, f"{path}, row {i}", row) for i, row in enumerate(rows)]


def local_path(source) -> Path | None:
    """The file `source` names, or None for a Hub dataset name. Raises at once for a missing
    local-looking path or a directory (also used to check a config before any rank starts)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: pass one {'/'.join(READERS)} file")
    if path.exists():
        return path
    if _looks_local(text):
        raise FileNotFoundError(f"no such file: {path.absolute()}")
    return None


def _read(source, split: str, on_bad=_raise) -> list:
    """(index, where, raw row) for every row; `on_bad(error)` gets each unreadable JSONL line."""
    text = str(source)
    if text in SHIPPED:
        path = SHIPPED[text] / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"shipped dataset {text!r} has no split {split!r} ({path})")
        return _read_jsonl(path, on_bad)
    path = local_path(text)
    if path is None:
        from datasets import load_dataset  # a Hugging Face dataset name
        return [(i, f"{text} ({split}), row {i}", row) for i, row in enumerate(load_dataset(text, split=split))]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, on_bad)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataFileError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(READERS)}")


def read_records(source, split: str = "train") -> list[dict]:
    """Raw rows from a shipped name, a local file, or a Hugging Face dataset name."""
    return [row for _, _, row in _read(source, split)]


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

    def bad(e: InvalidRowError):
        if not drop_invalid:
            raise e from None
        data.dropped[e.problem] += 1

    for i, where, raw in _read(source, split, bad):
        try:
            data.rows.append(validate_row(i, raw, tokenizer, max_length))
        except InvalidRowError as e:
            bad(type(e)(e.index, e.detail, where))  # the same error, placed in its file
    if not data.rows:
        raise ValueError(f"{source!r} ({split}) has no valid rows; dropped: {dict(data.dropped)}")
    return data
