"""A bad data file is named by file and line; a bad source is named at once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_lab.data import (DataFileError, InvalidUTF8Error, MalformedLineError, MissingFieldError,
                          load_preferences)

GOOD = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
LINE = json.dumps(GOOD)
REPO = Path(__file__).resolve().parents[1]


def _file(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub lookup fails the test: a local-looking source must never reach it."""
    import datasets

    def hub(*a, **k):
        raise AssertionError(f"asked the Hugging Face Hub for {a}")
    monkeypatch.setattr(datasets, "load_dataset", hub)


def test_malformed_line_names_file_and_line_counting_blank_lines(tmp_path):
    # lines: 1 good, 2 blank, 3 good, 4 blank, 5 broken, 6 good
    path = _file(tmp_path, "prefs.jsonl", f"{LINE}\n\n{LINE}\n   \n{LINE[:-5]}\n{LINE}\n")
    with pytest.raises(MalformedLineError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"{path}, line 5: malformed JSON line: ")
    data = load_preferences(path, drop_invalid=True)
    assert len(data) == 3 and data.dropped == {"malformed JSON line": 1}


def test_bad_row_after_blank_lines_gets_its_file_line(tmp_path):
    path = _file(tmp_path, "prefs.jsonl", f"\n{LINE}\n\n\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(MissingFieldError, match=r"prefs\.jsonl, line 5: missing field: 'rejected'"):
        load_preferences(path)


def test_invalid_utf8_names_file_and_line_or_is_dropped(tmp_path):
    bad = json.dumps({**GOOD, "prompt": "caf\u00e9"}, ensure_ascii=False).encode().replace("\u00e9".encode(), b"\xe9")  # latin-1 é
    path = _file(tmp_path, "prefs.jsonl", LINE.encode() + b"\n" + bad + b"\n" + LINE.encode() + b"\n")
    with pytest.raises(InvalidUTF8Error, match=r"prefs\.jsonl, line 2: invalid UTF-8: byte 0xe9 at column 16"):
        load_preferences(path)
    data = load_preferences(path, drop_invalid=True)
    assert len(data) == 2 and data.dropped == {"invalid UTF-8": 1}


def test_json_lines_saved_as_json_says_so(tmp_path):
    path = _file(tmp_path, "prefs.json", f"{LINE}\n{LINE}\n")
    with pytest.raises(DataFileError, match=r"prefs\.json, line 2: .*looks like JSON Lines.*rename it to \.jsonl"):
        load_preferences(path)


def test_malformed_or_non_utf8_json_file_names_the_line(tmp_path):
    path = _file(tmp_path, "prefs.json", f"[\n{LINE},\n{LINE[:-1]}\n]")
    with pytest.raises(DataFileError, match=r"prefs\.json, line 4: malformed JSON"):
        load_preferences(path)
    path = _file(tmp_path, "latin.json", b"[\n" + LINE.encode() + b",\n" + LINE.encode().replace(b"1+2", b"\xb9+2") + b"\n]")
    with pytest.raises(DataFileError, match=r"latin\.json, line 3: invalid UTF-8"):
        load_preferences(path)


@pytest.mark.parametrize("name, content", [
    ("prefs.jsonl", f"\ufeff{LINE}\n{LINE}\n"),
    ("prefs.json", f"\ufeff[{LINE}, {LINE}]"),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    assert load_preferences(_file(tmp_path, name, content)).rows == [GOOD, GOOD]


def test_files_are_read_as_utf8_under_an_ascii_locale(tmp_path):
    row = {"prompt": "\u00bfcu\u00e1nto es 1+2? \u2192", "chosen": "3 \u2713", "rejected": "4 \u2717"}
    for name in ("prefs.jsonl", "prefs.json"):
        text = json.dumps(row, ensure_ascii=False)
        _file(tmp_path, name, text + "\n" if name.endswith("l") else f"[{text}]")
    # C locale with UTF-8 mode and locale coercion off: open() without encoding= would use ASCII
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(REPO))
    code = ("import json, sys; from dpo_lab.data import load_preferences; "
            "print(json.dumps([load_preferences(p).rows for p in sys.argv[1:]]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "prefs.jsonl"), str(tmp_path / "prefs.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[row], [row]]


@pytest.mark.parametrize("source", ["./missing", "missing.jsonl", "missing.JSON", "~/missing-dpo-lab-data",
                                    "/no/such/dir/prefs", "a/b/c", "prefs.csv"])
def test_a_missing_local_looking_source_is_no_such_file_without_the_hub(no_hub, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file: "):
        load_preferences(source)


def test_a_hub_name_still_goes_to_the_hub(monkeypatch):
    import datasets
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or [GOOD])
    assert load_preferences("owner/some-prefs", split="test").rows == [GOOD]
    assert asked == [("owner/some-prefs", "test")]


def test_a_directory_is_refused_by_name(no_hub, tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        load_preferences(tmp_path)


@pytest.mark.parametrize("name", ["prefs.JSONL", "prefs.Json", "prefs.Parquet"])
def test_suffixes_match_in_any_case(no_hub, tmp_path, name):
    path = tmp_path / name
    if name.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([GOOD]), path)
    else:
        path.write_text(LINE + "\n" if name.lower().endswith("l") else f"[{LINE}]", encoding="utf-8")
    assert load_preferences(path).rows == [GOOD]


@pytest.mark.parametrize("name, words", [
    ("prefs.csv", r"prefs\.csv: unsupported file type '\.csv'"),
    ("prefs.parquet", r"prefs\.parquet: not a readable Parquet file"),
])
def test_an_unreadable_file_type_is_named(no_hub, tmp_path, name, words):
    with pytest.raises(DataFileError, match=words):
        load_preferences(_file(tmp_path, name, "prompt,chosen,rejected\n1+2=,3,4\n"))
