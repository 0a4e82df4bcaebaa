"""Numbers in lessons come from a run, and stay true: the numbers block of each lesson (dpo_lab.quotes).

Smoke quotes are compared with the smoke figures whenever a notebook test runs its notebook
(tests/conftest.py); full-profile quotes with results/<notebook>.json here."""
import json

import pytest

from dpo_lab import quotes as Q
from dpo_lab.workbook import list_notebooks

LESSONS = list_notebooks()  # one lesson per notebook, same name

TEXT = """Post-norm at depth 12 stalled (3.94); pre-norm trained (1.56) and trained (1.55).
From scratch RMSNorm takes 0.49 of LayerNorm's time; warm-up over 0.1 of the steps.
| 12 | trained (1.56) | x

<!-- numbers
"stalled (3.94)"                smoke post_d12
"| 12 | trained ({1.56})"       smoke 02_normalization:pre_d12
"0.49 of"                       timing
"0.1 of the steps"              given
-->
"""


def test_block_is_read_and_numbers_compare_to_the_printed_digits():
    qs = Q.quotes("02_normalization", TEXT)
    assert [(q.kind, q.notebook, q.figure) for q in qs][:2] == [
        ("smoke", "02_normalization", "post_d12"), ("smoke", "02_normalization", "pre_d12")]
    assert Q.compare(qs[0], 3.9449) is None and Q.compare(qs[0], 3.935) is None
    assert "gives 02_normalization:post_d12 = 3.9451" in Q.compare(qs[0], 3.9451)
    assert Q.compare(qs[1], 1.555) is None and Q.compare(qs[1], 1.5649) is None
    assert Q.compare(qs[1], 1.5651) is not None
    assert "not a number" in Q.compare(qs[0], "3.94")


def test_every_decimal_of_the_prose_must_be_accounted_for():
    assert Q.unaccounted("02_normalization", TEXT) == [
        "1.56 in 'Post-norm at depth 12 stalled (3.94); pre-norm trained (1.56) and trained (1.55).'",
        "1.55 in 'Post-norm at depth 12 stalled (3.94); pre-norm trained (1.56) and trained (1.55).'"]
    assert Q.missing_snippets("02_normalization", TEXT) == []
    stale = TEXT.replace("stalled (3.94)", "stalled (3.95)", 1)
    assert Q.missing_snippets("02_normalization", stale) == [
        "lessons/02_normalization.md, numbers block line 6: 'stalled (3.94)' is not in the lesson"]
    twice = TEXT.replace("0.49 of", "0.49 of LayerNorm, 0.49 of", 1)
    assert "2 times: lengthen it" in Q.missing_snippets("02_normalization", twice)[0]


def test_percent_and_exponents():
    text = 'Accuracy 93.8% and a gap of 1.7e-5.\n<!-- numbers\n"93.8%" smoke acc\n"1.7e-5" smoke gap\n-->\n'
    acc, gap = Q.quotes("x", text)
    assert Q.compare(acc, 0.93849) is None and Q.compare(acc, 0.9386) is not None
    assert Q.compare(gap, 1.74e-5) is None and Q.compare(gap, 1.76e-5) is not None


@pytest.mark.parametrize("bad,says", [
    ('"x 1.2" smoke', "needs a figure KEY"), ('"x 1.2" given key', "takes no KEY"),
    ('"x 1.2" measured k', "is not one of"), ("x 1.2 smoke k", "cannot read")])
def test_a_bad_entry_is_named_with_its_line(bad, says):
    with pytest.raises(Q.QuoteError, match=says):
        Q.quotes("x", f"text\n<!-- numbers\n{bad}\n-->\n")


def test_a_snippet_with_two_numbers_must_mark_one():
    q = Q.quotes("x", 'a\n<!-- numbers\n"depth 12: 3.94" smoke k\n-->\n')[0]
    assert "holds 2 numbers: mark the one" in Q.compare(q, 3.94)


def test_smoke_quotes_are_checked_against_a_notebooks_figures(monkeypatch):
    monkeypatch.setattr(Q, "_lesson_text", lambda lesson: TEXT if lesson == "02_normalization" else "")
    assert Q.check_smoke("02_normalization", {"post_d12": 3.94, "pre_d12": 1.56}) == []
    wrong = Q.check_smoke("02_normalization", {"post_d12": 2.0})
    assert any("gives 02_normalization:post_d12 = 2" in w for w in wrong)
    assert any("writes no figure 'pre_d12'" in w for w in wrong)


def test_results_record_the_machine(tmp_path):
    path = Q.write_results("01_rlhf_to_dpo", {"a": 1.0}, 12.3, tmp_path)
    data = json.loads(path.read_text())
    assert data["profile"] == "full" and data["figures"] == {"a": 1.0}
    assert {"cpu", "cores", "torch", "date"} <= set(data["machine"])


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_numbers_block_is_consistent(lesson):
    """Every lesson has a numbers block: every snippet is in the lesson once, every decimal of the
    prose is accounted for, every smoke quote names a notebook, every full quote matches results/."""
    qs = Q.quotes(lesson)
    assert qs, f"lessons/{lesson}.md has no <!-- numbers --> block (see dpo_lab/quotes.py)"
    assert Q.missing_snippets(lesson) == []
    assert Q.unaccounted(lesson) == []
    assert all(q.notebook in LESSONS for q in qs if q.kind in ("smoke", "full"))
    assert Q.check_full(lesson) == []
