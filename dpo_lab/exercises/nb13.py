"""Checks of notebook 13's exercises (curriculum). Each check writes its reference out here, not
with `task.carries` or `curriculum.root_pacing`, so it shares no code with the solution it grades."""
import math

from dpo_lab.exercises import Wrong, exercise

# (a, b) pairs that tell the usual mistakes apart: a digit sum of exactly 10, a carry that ripples
# on (99+1, 195+5), one only because of the incoming carry (46+57: 4+5+1), numbers of unequal length.
PAIRS = [(0, 0), (12, 3), (37, 5), (37, 3), (95, 7), (99, 1), (9, 1), (46, 57), (55, 55), (195, 5),
         (999, 1), (5, 95), (1, 99), (123, 456), (58, 42), (909, 91)]


def _carries(a, b):
    # a carry leaves digit position k-1 exactly when the low k digits of a and b sum past 10^k
    return sum((a % 10**k + b % 10**k) >= 10**k for k in range(1, len(str(max(a, b))) + 2))


def _digitwise(a, b, threshold=10, propagate=True, until_shorter=False):
    count, carry = 0, 0
    while (a and b) if until_shorter else (a or b):
        s = a % 10 + b % 10 + (carry if propagate else 0)
        carry = int(s >= threshold)
        count += carry
        a, b = a // 10, b // 10
    return count


@exercise("13.1", "the difficulty score: how many carries a+b needs")
def check_carries(fn):
    """fn(a, b) -> the number of digit positions of a + b that produce a carry (a, b >= 0)."""
    got = [fn(a, b) for a, b in PAIRS]
    if any(isinstance(g, bool) for g in got):
        raise Wrong("return how many carries (an int: 95+7 has 2), not whether there is one")
    want = [_carries(a, b) for a, b in PAIRS]
    if got == want:
        return
    variants = [
        ([int(a % 10 + b % 10 >= 10) for a, b in PAIRS],
         "only the units carry is counted: every digit position can carry (95+7 carries twice)"),
        ([_digitwise(a, b, propagate=False) for a, b in PAIRS],
         "the incoming carry is left out of each digit sum: 46+57 carries twice (6+7, then 4+5+1)"),
        ([_digitwise(a, b, until_shorter=True) for a, b in PAIRS],
         "the loop stops when the shorter number runs out of digits: 99+1 carries twice"),
        ([_digitwise(a, b, threshold=11) for a, b in PAIRS],
         "a digit sum of exactly 10 carries too (37+3): the test is >= 10"),
    ]
    for values, diagnosis in variants:
        if got == values:
            raise Wrong(diagnosis)
    (a, b), g, w = next(((p, g, w) for p, g, w in zip(PAIRS, got, want) if g != w))
    raise Wrong(f"{a}+{b}: got {g} carries, expected {w}")


@exercise("13.2", "root pacing: the fraction of the sorted pool open at step t")
def check_root_pacing(fn):
    """fn(step, start, full_at) -> start + (1 - start) * sqrt(step / full_at), and 1 from full_at on
    (Wu et al. 2021's square-root pacing, as a fraction of the difficulty-sorted pool)."""
    for start, full_at in [(0.2, 100), (0.05, 7)]:
        for step in [0, 1, 3, full_at // 2, full_at - 1, full_at, 2 * full_at, 10 * full_at]:
            want = min(1.0, start + (1 - start) * math.sqrt(min(step, full_at) / full_at))
            got = float(fn(step, start, full_at))
            if abs(got - want) <= 1e-9:
                continue
            if step > full_at and got > 1:
                raise Wrong(f"at step {step} > full_at the fraction is {got:.3f}: clamp it at 1 (the whole pool)")
            if step == 0 and abs(got) < 1e-9:
                raise Wrong(f"at step 0 the fraction is 0: nothing could be sampled; start from start={start}")
            if abs(got - min(1.0, start + (1 - start) * step / full_at)) <= 1e-9:
                raise Wrong(f"at step {step} got {got:.4f}, the linear pacing's value: root pacing "
                            f"grows as sqrt(step / full_at)")
            if abs(got - min(1.0, start + math.sqrt(min(step, full_at) / full_at))) <= 1e-9:
                raise Wrong(f"at step {step} got {got:.4f}: scale the square root by (1 - start), "
                            f"so the fraction reaches exactly 1 at full_at")
            raise Wrong(f"at step {step} (start={start}, full_at={full_at}) got {got:.4f}, expected {want:.4f}")
