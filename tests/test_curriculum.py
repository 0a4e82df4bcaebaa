"""The curriculum samplers: seeded, paced, length-capped, and fair in tokens."""
import itertools

import pytest

from dpo_lab import task
from dpo_lab.curriculum import EasyToHard, LengthWarmup, RandomOrder, linear_pacing, root_pacing

PROBLEMS = task.all_problems(min_a=0, max_a=99, max_b=9)
# prompt + answer + EOS, one token per character
LENGTHS = [len(task.prompt_of(a, b)) + len(task.answer(a, b)) + 1 for a, b in PROBLEMS]
SCORES = [task.carries(a, b) for a, b in PROBLEMS]
BUDGET = 256


def samplers(seed=0):
    return {
        "random": RandomOrder(LENGTHS, BUDGET, seed),
        "easy_to_hard": EasyToHard(LENGTHS, SCORES, linear_pacing(0.2, 50), BUDGET, seed),
        "length_warmup": LengthWarmup(LENGTHS, min(LENGTHS), max(LENGTHS), 50, BUDGET, seed),
    }


def take(sampler, n):
    return list(itertools.islice(sampler, n))


def test_carries_counts_every_position():
    assert [task.carries(*p) for p in [(12, 3), (37, 5), (95, 7), (9, 1), (0, 0), (99, 1), (999, 1)]] \
        == [0, 1, 2, 1, 0, 2, 3]


@pytest.mark.parametrize("name", ["random", "easy_to_hard", "length_warmup"])
def test_seeded_determinism(name):
    assert take(samplers(0)[name], 60) == take(samplers(0)[name], 60)
    assert take(samplers(0)[name], 60) != take(samplers(1)[name], 60)


@pytest.mark.parametrize("pacing", [linear_pacing(0.1, 100), root_pacing(0.1, 100)])
def test_pacing_is_monotone_and_reaches_the_full_pool(pacing):
    fracs = [pacing(t) for t in range(300)]
    assert fracs[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(fracs, fracs[1:]))
    assert fracs[100] == fracs[-1] == 1.0 and fracs[99] < 1.0
    sampler = EasyToHard(LENGTHS, SCORES, pacing, BUDGET)
    assert sorted(sampler.available(100)) == list(range(len(PROBLEMS)))


def test_root_pacing_opens_faster_than_linear():
    lin, root = linear_pacing(0.1, 100), root_pacing(0.1, 100)
    assert all(root(t) > lin(t) for t in range(1, 100))


def test_easy_to_hard_serves_easier_rows_first():
    sampler = EasyToHard(LENGTHS, SCORES, linear_pacing(0.2, 50), BUDGET, seed=3)
    # 20 % of the pool is all carry-free (about half of it is): only score-0 rows early on
    early = [i for batch in take(sampler, 5) for i in batch]
    assert {SCORES[i] for i in early} == {0}
    # the pool opens in score order: the hardest row available never gets easier
    hardest = [max(SCORES[i] for i in sampler.available(t)) for t in range(60)]
    assert hardest == sorted(hardest) and hardest[-1] == max(SCORES)
    # and ties are not taken in the pool's order (a, b ascending)
    assert sampler.available(0) != sorted(sampler.available(0))


def test_length_warmup_never_exceeds_the_scheduled_length():
    sampler = LengthWarmup(LENGTHS, min(LENGTHS), max(LENGTHS), 40, BUDGET, seed=2)
    caps = [sampler.max_len(t) for t in range(60)]
    assert caps[0] == min(LENGTHS) and caps[40] == max(LENGTHS) and caps == sorted(caps)
    for t in range(60):
        batch = next(sampler)
        assert max(LENGTHS[i] for i in batch) <= caps[t], f"step {t}"
    assert len({caps[t] for t in range(41)}) == max(LENGTHS) - min(LENGTHS) + 1  # every length is a stage


def test_equal_token_budget_across_samplers():
    steps, longest = 80, max(LENGTHS)
    for name, sampler in samplers(5).items():
        batches = take(sampler, steps)
        served = sum(LENGTHS[i] for b in batches for i in b)
        assert sampler.tokens_seen == served, name
        # each batch stops only when the next row would not fit: full to within one row
        for b in batches:
            assert BUDGET - longest < sum(LENGTHS[i] for i in b) <= BUDGET, name


def test_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="tokens_per_batch=5"):
        RandomOrder(LENGTHS, 5)
    with pytest.raises(ValueError, match="3 scores"):
        EasyToHard(LENGTHS, [0, 1, 2], linear_pacing(0.5, 10), BUDGET)
    with pytest.raises(ValueError, match="start must be in"):
        linear_pacing(0.0, 10)
    with pytest.raises(ValueError, match="start_len=2"):
        LengthWarmup(LENGTHS, 2, max(LENGTHS), 10, BUDGET)
    with pytest.raises(ValueError, match="end_len=7"):
        LengthWarmup(LENGTHS, min(LENGTHS), 7, 10, BUDGET)


# Notebook 13's graders pass the library's own versions (the wrong solutions: tests/test_exercises.py).
from dpo_lab import exercises as ex  # noqa: E402


def test_the_library_passes_the_graders():
    assert ex.grade(ex.get("13.1"), task.carries).status == "pass"
    assert ex.grade(ex.get("13.2"), lambda t, s, f: root_pacing(s, f)(t)).status == "pass"


def test_train_sft_takes_its_batches_from_the_sampler():
    from dpo_lab.models import build_tiny_model, build_tokenizer, train_sft
    rows = [{"prompt": task.prompt_of(a, b), "completion": task.answer(a, b)} for a, b in PROBLEMS[:20]]
    lengths = [len(r["prompt"]) + len(r["completion"]) + 1 for r in rows]
    sampler = RandomOrder(lengths, 16, seed=0)  # two rows of 6-8 tokens per batch
    served, seen = [], []

    class Recording:
        def __next__(self):
            served.append(next(sampler))
            return served[-1]

    def on_step(step, model):
        seen.append((step, model.training))
        model.eval()  # as an evaluation would; train_sft must switch back
    model = build_tiny_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    losses = train_sft(model, build_tokenizer(), rows, 3, None, 1e-3, 1, 0, progress=False,
                       sampler=Recording(), on_step=on_step)
    assert len(served) == 3 and len(losses) == 3
    assert seen == [(1, True), (2, True), (3, True)]
    assert not model.training
