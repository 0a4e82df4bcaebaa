import json

import pytest

from dpo_lab import task
from dpo_lab.data import (BadMessageError, EmptyCompletionError, IdenticalCompletionsError,
                          InvalidRowError, MissingFieldError, NotAStringError, TooLongError,
                          load_preferences, validate_row)
from dpo_lab.models import build_tokenizer

GOOD = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}


@pytest.mark.parametrize("row, error, words", [
    ({"prompt": "1+2=", "chosen": "3"}, MissingFieldError, "missing field: 'rejected'"),
    ({"prompt": "1+2=", "chosen": 3, "rejected": "4"}, NotAStringError, "'chosen' is int"),
    ({"prompt": "1+2=", "chosen": "  ", "rejected": "4"}, EmptyCompletionError, "'chosen' is empty"),
    ({"prompt": "1+2=", "chosen": "3", "rejected": ""}, EmptyCompletionError, "'rejected' is empty"),
    ({"prompt": "1+2=", "chosen": "3", "rejected": "3"}, IdenticalCompletionsError, "identical"),
    ({"prompt": "1+2=" * 10, "chosen": "3", "rejected": "4"}, TooLongError, "41 characters > max_length 20"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, BadMessageError, "prompt[0]"),
])
def test_each_bad_row_gets_its_own_named_error(row, error, words):
    with pytest.raises(error) as info:
        validate_row(7, row, max_length=20, tokenizer=build_tokenizer() if isinstance(row["prompt"], list) else None)
    assert str(info.value).startswith("row 7: ") and words in str(info.value)


def _write(tmp_path, rows, suffix=".jsonl"):
    path = tmp_path / f"prefs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_bad_row_in_a_file_is_named_by_index_or_dropped_and_counted(tmp_path, suffix):
    rows = [GOOD, GOOD, {**GOOD, "rejected": "3"}, {**GOOD, "chosen": ""}, GOOD]
    path = _write(tmp_path, rows, suffix)
    where = "line 3" if suffix == ".jsonl" else "row 2"  # file lines are 1-based, rows 0-based
    with pytest.raises(IdenticalCompletionsError, match=f"prefs\\{suffix}, {where}: "):
        load_preferences(path)
    data = load_preferences(path, drop_invalid=True)
    assert len(data) == 3
    assert data.dropped == {"chosen identical to rejected": 1, "empty completion": 1}


def test_nothing_is_mangled(tmp_path):
    row = {"prompt": "  Q: 1+2=\n", "chosen": " 3\n", "rejected": "4 "}
    assert load_preferences(_write(tmp_path, [row])).rows == [row]


def test_conversational_rows_render_with_the_chat_template():
    tok = build_tokenizer()
    row = {"prompt": [{"role": "user", "content": "1+2="}],
           "chosen": [{"role": "assistant", "content": "3"}],
           "rejected": [{"role": "assistant", "content": "4"}]}
    out = validate_row(0, row, tok)
    assert out["prompt"] == "<|user|>1+2=\n<|assistant|>"
    assert out["chosen"] == "3<eos>\n" and out["rejected"] == "4<eos>\n"
    with pytest.raises(ValueError, match="row 0 is conversational"):
        validate_row(0, row, None)


def test_max_length_counts_tokens_when_a_tokenizer_is_given():
    tok = build_tokenizer()
    assert validate_row(0, GOOD, tok, max_length=5)  # 4 + 1 tokens
    with pytest.raises(TooLongError, match="5 tokens > max_length 4"):
        validate_row(0, GOOD, tok, max_length=4)


def test_all_invalid_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no valid rows"):
        load_preferences(_write(tmp_path, [{**GOOD, "chosen": "4"}]), drop_invalid=True)


def test_shipped_task_loads_and_every_chosen_is_correct_and_rejected_is_not():
    for split in ("train", "test"):
        data = load_preferences("arith", split=split)
        assert all(task.is_correct(r["prompt"], r["chosen"]) for r in data.rows)
        assert not any(task.is_correct(r["prompt"], r["rejected"]) for r in data.rows)


def test_shipped_splits_regenerate_byte_for_byte(tmp_path):
    files = task.generate(tmp_path)
    for name, path in files.items():
        assert path.read_bytes() == (task.TASK_DIR / path.name).read_bytes(), name


def test_train_and_test_problems_are_disjoint():
    train = {r["prompt"] for r in load_preferences("arith").rows}
    test = {r["prompt"] for r in load_preferences("arith", split="test").rows}
    assert train and test and not train & test


def test_demonstrator_mostly_forgets_carries():
    rows = task.read_jsonl(task.TASK_DIR / "sft.jsonl")
    carry = [r for r in rows if task.needs_carry(*task.parse_prompt(r["prompt"]))]
    forgot = sum(r["completion"] == task.dropped_carry(*task.parse_prompt(r["prompt"])) for r in carry)
    assert 0.5 < forgot / len(carry) < 0.7


def test_checker():
    assert task.is_correct("37+5=", "42") and task.is_correct("37+5=", " 42\nmore")
    assert not task.is_correct("37+5=", "32") and not task.is_correct("37+5=", "420")
    with pytest.raises(ValueError, match="not an addition prompt"):
        task.is_correct("hello", "1")
    assert isinstance(InvalidRowError(1, "x"), ValueError)
