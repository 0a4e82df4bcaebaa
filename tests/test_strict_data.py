"""The column in a malformed JSONL line's error is the column an editor shows on that line: the
line ending (LF or CRLF) and a BOM are not part of the line's text."""
import json

import pytest

from dpo_lab.data import MalformedLineError, load_preferences

LINE = json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "4"})
CUT = LINE[:-5]  # ends right after '"rejected":': json wants a value at the next column


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("bom", ["", "\ufeff"])
def test_column_of_a_truncated_line_is_just_after_its_last_character(tmp_path, ending, bom):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(f"{bom}{CUT}{ending}{LINE}{ending}".encode())
    with pytest.raises(MalformedLineError) as info:
        load_preferences(path)
    assert str(info.value) == f"{path}, line 1: malformed JSON line: Expecting value at column {len(CUT) + 1}: {CUT!r}"
