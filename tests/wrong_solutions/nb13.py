import math

from tests.wrong_solutions import wrong


@wrong("13.1", "not whether there is one")
def carries_bool(a, b):
    return a % 10 + b % 10 >= 10


@wrong("13.1", "only the units carry is counted")
def carries_units_only(a, b):
    return int(a % 10 + b % 10 >= 10)


@wrong("13.1", "incoming carry is left out")
def carries_no_ripple(a, b):
    count = 0
    while a or b:
        count += a % 10 + b % 10 >= 10
        a, b = a // 10, b // 10
    return count


@wrong("13.1", "shorter number runs out of digits")
def carries_zip_digits(a, b):
    count, carry = 0, 0
    for x, y in zip(reversed(str(a)), reversed(str(b))):
        carry = int(int(x) + int(y) + carry >= 10)
        count += carry
    return count


@wrong("13.1", "exactly 10 carries too")
def carries_strict(a, b):
    count, carry = 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry > 10)
        count += carry
        a, b = a // 10, b // 10
    return count


@wrong("13.2", "clamp it at 1")
def root_unclamped(step, start, full_at):
    return start + (1 - start) * math.sqrt(step / full_at)


@wrong("13.2", "the linear pacing's value")
def root_is_linear(step, start, full_at):
    return min(1.0, start + (1 - start) * step / full_at)


@wrong("13.2", "scale the square root by (1 - start)")
def root_unscaled(step, start, full_at):
    return min(1.0, start + math.sqrt(step / full_at))


@wrong("13.2", "nothing could be sampled")
def root_no_start(step, start, full_at):
    return min(1.0, math.sqrt(step / full_at))
