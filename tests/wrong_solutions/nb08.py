from tests.wrong_solutions import wrong


def _one_f_one_b(s, p, m, warm_extra=0, cap=True, b_first=False, drain_reversed=False):
    """The exercise's solution with one of the usual mistakes switched on."""
    warmup = p - s - 1 + warm_extra
    warmup = min(warmup, m) if cap else warmup
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        b = ("B", i)
        order += [b, ("F", warmup + i)] if b_first else [("F", warmup + i), b]
    drain = range(max(m - warmup, 0), m)
    order += [("B", i) for i in (reversed(drain) if drain_reversed else drain)]
    return order


@wrong("08.1", "warm-up off by one, it is p − s − 1 forwards (the last stage runs none), not p − s")
def warmup_p_minus_s(s, p, m):
    return _one_f_one_b(s, p, m, warm_extra=1)


@wrong("08.1", "the warm-up is capped at m")
def warmup_not_capped(s, p, m):
    return _one_f_one_b(s, p, m, cap=False)


@wrong("08.1", "B0 comes before F0")
def backward_first_in_steady_state(s, p, m):
    return _one_f_one_b(s, p, m, b_first=True)


@wrong("08.1", "runs out of order: B7 where B6 was expected")
def drain_like_a_stack(s, p, m):
    # the cool-down pops the newest micro-batch first; the next stage sends the oldest gradient first
    return _one_f_one_b(s, p, m, drain_reversed=True)


@wrong("08.1", "that is GPipe")
def gpipe_order(s, p, m):
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


@wrong("08.1", "the stage runs out of order at position")
def all_warmup_backwards_first(s, p, m):
    # warm-up, then all remaining forwards, then all backwards: right counts, no alternation
    w = min(p - s - 1, m)
    order = [("F", i) for i in range(w)]
    if w < m:
        order += [("F", w), ("B", 0)] + [("F", i) for i in range(w + 1, m)] + [("B", i) for i in range(1, m)]
    else:
        order += [("B", i) for i in range(m)]
    return order


# --- 08.2 -----------------------------------------------------------------------------------------

@wrong("08.2", "bubble over the ideal time")
def bubble_over_ideal(p, m, v):
    return (p - 1) / (v * m)


@wrong("08.2", "v is missing")
def bubble_without_v(p, m, v):
    return (p - 1) / (m + p - 1)


@wrong("08.2", "p − 1 hand-overs long, not p")
def bubble_p_not_p_minus_1(p, m, v):
    return p / (v * m + p)
