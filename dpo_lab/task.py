"""A small verifiable preference task: two-number addition, checked by code.

    prompt "37+5="   chosen "42"   rejected "32"   (a typical mistake: a forgotten carry)

Because a program can tell right from wrong, later lessons can measure whether alignment worked
(generation success), not only whether the loss went down. Everything is generated from a seed.

The SFT data imitates a *flawed demonstrator*: when the units digits need a carry it usually
forgets it (37+5 -> 32), and now and then it slips in other ways (off by one, swapped digits). A model
that imitates it learns the forgotten carry as the most likely answer, so its greedy answers are
decent but clearly imperfect. The preference pairs prefer the correct sum over the
demonstrator's typical mistake, which is what DPO needs to fix. Train and test use disjoint
problems.
"""
import json
import random
from pathlib import Path

from dpo_lab.paths import DATA_DIR

TASK_DIR = DATA_DIR / "arith"
SEED = 1234
# A two-digit number plus a digit, sums below 100: every prompt and answer has the same digit
# positions, which lets a tiny model learn the rule rather than memorise problems.
MIN_A, MAX_A, MAX_B = 10, 89, 9


def answer(a: int, b: int) -> str:
    return str(a + b)


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    body = prompt.strip()
    if not body.endswith("=") or "+" not in body:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    a, b = body[:-1].split("+")
    return int(a), int(b)


def is_correct(prompt: str, completion: str) -> bool:
    """True if the completion's first line is exactly the right sum (whitespace and EOS ignored)."""
    a, b = parse_prompt(prompt)
    first = completion.strip().split("\n")[0].strip()
    return first == answer(a, b)


def needs_carry(a: int, b: int) -> bool:
    """True when the units digits sum past 9."""
    return a % 10 + b % 10 >= 10


def carries(a: int, b: int) -> int:
    """How many digit positions produce a carry: 0 for 12+3, 1 for 37+5, 2 for 95+7 (9+1 carries too)."""
    count, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


def dropped_carry(a: int, b: int) -> str:
    """The sum with the carry out of the units forgotten: 37+5 -> 32."""
    return str(a + b - 10)


def mistake(a: int, b: int, rng: random.Random) -> str:
    """The demonstrator's typical mistake: a dropped carry if there is one, else a slip."""
    if needs_carry(a, b):
        return dropped_carry(a, b)
    return slip(a, b, rng)


def slip(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer other than a dropped carry, never the right one."""
    right = a + b
    while True:
        kind = rng.choice(["off_by_one", "tens", "swap"])
        if kind == "off_by_one":
            wrong = right + rng.choice([-1, 1])
        elif kind == "tens":
            wrong = right + rng.choice([-10, 10])
        else:                 # swap the last two digits
            s = str(right)
            wrong = int(s[:-2] + s[-1] + s[-2]) if len(s) >= 2 else right + 1
        if wrong != right and wrong >= 0:
            return str(wrong)


def all_problems(min_a: int = MIN_A, max_a: int = MAX_A, max_b: int = MAX_B) -> list[tuple[int, int]]:
    """Every a+b with min_a <= a <= max_a and 0 <= b <= max_b. The defaults are the DPO task's
    fixed-length problems; min_a=0 also gives shorter ones (3+4=7) and max_a=99 longer sums (95+7=102)."""
    return [(a, b) for a in range(min_a, max_a + 1) for b in range(max_b + 1)]


def split_problems(seed: int = SEED, n_test: int = 160):
    """Disjoint train/test problems: the test set measures generalisation, not memory."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    return problems[n_test:], problems[:n_test]


def preference_rows(problems, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt_of(a, b), "chosen": answer(a, b), "rejected": mistake(a, b, rng)}
            for a, b in problems]


def sft_rows(problems, seed: int, carry_error: float = 0.6, slip_rate: float = 0.05,
             per_problem: int = 3) -> list[dict]:
    """Demonstrations: a carry is forgotten with probability carry_error, other slips are rarer.

    Several demonstrations per problem, so a model learns the demonstrator's distribution
    (mostly forgetting carries) rather than one memorised answer per problem.
    """
    rng = random.Random(seed)
    rows = []
    for a, b in [p for p in problems for _ in range(per_problem)]:
        if needs_carry(a, b) and rng.random() < carry_error:
            completion = dropped_carry(a, b)
        elif rng.random() < slip_rate:
            completion = slip(a, b, rng)
        else:
            completion = answer(a, b)
        rows.append({"prompt": prompt_of(a, b), "completion": completion})
    return rows


def write_jsonl(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(out_dir: Path = TASK_DIR, seed: int = SEED, n_test: int = 160) -> dict:
    """Write sft.jsonl, train.jsonl (preferences) and test.jsonl; return their paths."""
    train, test = split_problems(seed, n_test)
    files = {"sft": Path(out_dir) / "sft.jsonl", "train": Path(out_dir) / "train.jsonl",
             "test": Path(out_dir) / "test.jsonl"}
    write_jsonl(sft_rows(train, seed + 1), files["sft"])
    write_jsonl(preference_rows(train, seed + 2), files["train"])
    write_jsonl(preference_rows(test, seed + 3), files["test"])
    return files


if __name__ == "__main__":  # python -m dpo_lab.task  regenerates data/arith/
    for name, path in generate().items():
        print(f"{name:6s} {path}  ({len(read_jsonl(path))} rows)")
