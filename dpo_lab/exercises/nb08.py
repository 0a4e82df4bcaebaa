"""Checks of notebook 08's exercises (pipeline parallelism).

Schedules are plain data, so these checks need no ranks: 08.1 compares one stage's 1F1B order with
`dpo_lab.parallel.schedules.one_f_one_b` (tested against its properties and the simulator in
tests/test_schedules.py), 08.2 the bubble fraction with the bubble of the simulated schedules
(`simulate`, which replays the plan and shares no code with a formula).
"""
from dpo_lab.exercises import Wrong, exercise
from dpo_lab.parallel.schedules import bubble_fraction, make_schedule, one_f_one_b, simulate

# A typical pipeline first (its diagnosis reads best), then every small one; m < p too (capped warm-up)
CASES = [(4, 8), (3, 5), (4, 2)] + [(p, m) for p in range(1, 6) for m in range(1, 10)]


def _as_events(got, s, p, m) -> list[tuple[str, int]]:
    where = f"stage {s} of p={p}, m={m}"
    if not isinstance(got, (list, tuple)):
        raise Wrong(f"{where}: return a list of ('F', i) / ('B', i) pairs, got {type(got).__name__}")
    out = []
    for e in got:
        kind, mb = getattr(e, "kind", None), getattr(e, "microbatch", None)  # an Action is fine too
        if kind is None:
            if not (isinstance(e, (list, tuple)) and len(e) == 2):
                raise Wrong(f"{where}: each event is a pair ('F', i) or ('B', i), got {e!r}")
            kind, mb = e
        if kind not in ("F", "B") or not isinstance(mb, int):
            raise Wrong(f"{where}: each event is a pair ('F', i) or ('B', i), got {e!r}")
        out.append((kind, mb))
    return out


def diagnose_stage(got, s: int, p: int, m: int) -> None:
    """Raise Wrong unless `got` is stage s's 1F1B order for p stages and m micro-batches."""
    ev = _as_events(got, s, p, m)
    where = f"stage {s} of p={p}, m={m}"
    want = [(a.kind, a.microbatch) for a in one_f_one_b(p, m)[s]]
    name = lambda e: f"{e[0]}{e[1]}"
    for e in ev:
        if not 0 <= e[1] < m:
            hint = (f": the warm-up is capped at m, min(p − s − 1, m) = {m}" if p - s - 1 > m else "")
            raise Wrong(f"{where}: {name(e)} does not exist, micro-batches are 0..{m - 1}{hint}")
    for kind in ("F", "B"):
        for i in range(m):
            n = ev.count((kind, i))
            if n != 1:
                raise Wrong(f"{where}: {kind}{i} appears {n} times, expected once")
    if len(ev) != 2 * m:
        raise Wrong(f"{where}: {len(ev)} events, expected 2m = {2 * m}")
    for i in range(m):
        if ev.index(("B", i)) < ev.index(("F", i)):
            raise Wrong(f"{where}: B{i} comes before F{i}: a micro-batch's backward needs its forward "
                        "(its activations, and the gradient the next stage sends back after its own F)")
    # 1F1B: p − s − 1 warm-up forwards, then the first steady forward, then the first backward
    lead = next((j for j, e in enumerate(ev) if e[0] == "B"), len(ev))
    if lead != min(p - s, m):
        why = ""
        if lead == min(p - s + 1, m):
            why = ": warm-up off by one, it is p − s − 1 forwards (the last stage runs none), not p − s"
        elif lead == m:
            why = ": that is GPipe (all forwards first); 1F1B starts backwards after p − s − 1 warm-up forwards"
        raise Wrong(f"{where}: {lead} forwards before the first backward, expected min(p − s, m) = "
                    f"{min(p - s, m)} (p − s − 1 = {p - s - 1} warm-up forwards, then one forward and one "
                    f"backward){why}")
    for kind in ("F", "B"):
        seq = [e[1] for e in ev if e[0] == kind]
        if seq != list(range(m)):
            j = next(j for j in range(m) if seq[j] != j)
            source = "the previous stage sends F0's input first" if kind == "F" else \
                "the next stage sends the oldest micro-batch's gradient back first"
            raise Wrong(f"{where}: the stage runs out of order: {kind}{seq[j]} where {kind}{j} was expected "
                        f"({kind}s go in micro-batch order, oldest first: {source})")
    if ev != want:
        j = next(j for j in range(len(ev)) if ev[j] != want[j])
        raise Wrong(f"{where}: the stage runs out of order at position {j}: {name(ev[j])} where 1F1B runs "
                    f"{name(want[j])}; after the warm-up, alternate one forward and one backward, then drain "
                    "the remaining backwards")


@exercise("08.1", "the 1F1B order of one stage")
def check_one_f_one_b(fn):
    """fn(s, p, m) -> [('F', 0), ..., ('B', m-1)] for every stage s of p ≤ 5 stages, m ≤ 9."""
    for p, m in CASES:
        for s in reversed(range(p)):  # the last stage first: it has no warm-up
            diagnose_stage(fn(s, p, m), s, p, m)


@exercise("08.2", "the bubble fraction")
def check_bubble(fn):
    """fn(p, m, v) -> the idle share of a step, compared with the simulated schedules (t_B = 2 t_F,
    free communication): GPipe and 1F1B at v = 1, interleaved 1F1B at v > 1."""
    cases = [(4, 8, 1), (4, 8, 2)] + [(p, m, 1) for p in (1, 2, 5) for m in (1, 3, 8)] + [(2, 4, 4), (3, 6, 2)]
    for p, m, v in cases:
        want = bubble_fraction(simulate(make_schedule("1f1b" if v == 1 else "interleaved", p, m, v)))
        got = fn(p, m, v)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise Wrong(f"return a number, got {type(got).__name__}") from None
        if abs(got - want) <= 1e-9:
            continue
        where = f"p={p}, m={m}, v={v}: got {got:.4g}, the simulated schedule idles {want:.4g}"
        close = lambda x: abs(got - x) <= 1e-9
        if close((p - 1) / (v * m)):
            raise Wrong(f"{where}: (p − 1)/(v·m) is the bubble over the ideal time; as a share of the "
                        "whole step divide by ideal + bubble: (p − 1)/(v·m + p − 1)")
        if v > 1 and close((p - 1) / (m + p - 1)):
            raise Wrong(f"{where}: v is missing: with v chunks per stage each hop takes 1/v of the time, "
                        "the ramps shrink v-fold")
        if close(p / (v * m + p)) or close(p / (v * m + p - 1)):
            raise Wrong(f"{where}: the ramp is p − 1 hand-overs long, not p (the first stage starts at once)")
        raise Wrong(where)
