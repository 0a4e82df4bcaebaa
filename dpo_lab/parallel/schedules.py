"""Pipeline schedules as plain data: for each stage, the ordered list of what it runs.

An Action is a forward ("F") or backward ("B") of one micro-batch through one model chunk.
With p stages and v chunks per stage, chunk c of stage r is virtual stage c·p + r: micro-batches
flow 0 → 1 → ... → v·p − 1 forward and back again backward (Narayanan et al., 2021).

- GPipe (Huang et al., 2019): all m forwards, then all m backwards. Keeps m micro-batches alive.
- 1F1B (PipeDream-Flush): stage r runs min(p − r − 1, m) warm-up forwards, then alternates one
  forward and one backward, then drains the remaining backwards. At most p micro-batches alive.
- Interleaved 1F1B: v chunks per stage; the bubble shrinks by v, at v× the point-to-point sends.

`simulate` replays a schedule with fixed F/B durations and the dependencies between stages, to
get the step each action starts at (what a Gantt chart of the plan shows) and to prove that the
schedule cannot deadlock.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str        # "F" or "B"
    microbatch: int
    chunk: int = 0   # model chunk on this stage (0 unless interleaved)

    def __repr__(self):
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def _check(p: int, m: int, v: int = 1):
    for name, val in (("p", p), ("m", m), ("v", v)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def gpipe(p: int, m: int) -> list[list[Action]]:
    _check(p, m)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    _check(p, m)
    stages = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        acts = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):  # steady state: one forward, one backward
            acts += [Action("F", warmup + i), Action("B", i)]
        acts += [Action("B", i) for i in range(m - warmup, m)]
        stages.append(acts)
    return stages


def interleaved_1f1b(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved schedule; m must be a multiple of p (micro-batches go in groups of p)."""
    _check(p, m, v)
    if m % p:
        raise ValueError(f"interleaved 1F1B needs m divisible by p, got m={m}, p={p}")
    total = m * v

    def action(k, kind):
        # The k-th forward (or backward) of a stage: groups of p micro-batches sweep the chunks.
        group, pos = divmod(k, p * v)
        chunk, offset = divmod(pos, p)
        if kind == "B":
            chunk = v - 1 - chunk
        return Action(kind, group * p + offset, chunk)

    stages = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        acts = [action(k, "F") for k in range(warmup)]
        for i in range(total - warmup):
            acts += [action(warmup + i, "F"), action(i, "B")]
        acts += [action(k, "B") for k in range(total - warmup, total)]
        stages.append(acts)
    return stages


def make_schedule(name: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved_1f1b(p, m, v)
    raise ValueError(f"unknown schedule {name!r}; have gpipe, 1f1b, interleaved")


def n_chunks(schedule) -> int:
    return 1 + max(a.chunk for stage in schedule for a in stage)


def dependencies(action: Action, stage: int, p: int, v: int) -> list[tuple[int, Action]]:
    """The (stage, action) pairs that must finish before `action` on `stage` can start."""
    vs = action.chunk * p + stage  # virtual stage
    last = v * p - 1
    if action.kind == "F":
        if vs == 0:
            return []
        prev = vs - 1
        return [(prev % p, Action("F", action.microbatch, prev // p))]
    deps = [(stage, Action("F", action.microbatch, action.chunk))]
    if vs < last:
        nxt = vs + 1
        deps.append((nxt % p, Action("B", action.microbatch, nxt // p)))
    return deps


def simulate(schedule, t_f: float = 1.0, t_b: float = 2.0) -> list[list[tuple[Action, float, float]]]:
    """Start/end times of every action when each stage runs its list in order, as soon as its
    dependencies are done. t_f / t_b are one micro-batch's forward / backward through a whole
    stage: with v chunks per stage each action takes t_f / v (t_b / v), so schedules of the same
    model compare on equal work. Raises if the schedule deadlocks or misses an action."""
    p, v = len(schedule), n_chunks(schedule)
    done: dict[tuple[int, Action], float] = {}
    pos, clock = [0] * p, [0.0] * p
    out = [[] for _ in range(p)]
    while any(pos[r] < len(schedule[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(schedule[r]):
                a = schedule[r][pos[r]]
                deps = dependencies(a, r, p, v)
                if not all(d in done for d in deps):
                    break
                start = max([clock[r], *(done[d] for d in deps)])
                end = start + (t_f if a.kind == "F" else t_b) / v
                done[(r, a)] = clock[r] = end
                out[r].append((a, start, end))
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: schedule[r][pos[r]] for r in range(p) if pos[r] < len(schedule[r])}
            raise RuntimeError(f"schedule deadlocks: stages wait forever at {stuck}")
    return out


def bubble_fraction(timeline) -> float:
    """Idle share of the makespan, averaged over stages: 1 − busy / (p · makespan)."""
    start = min(s for stage in timeline for _, s, _ in stage)
    end = max(e for stage in timeline for _, _, e in stage)
    busy = sum(e - s for stage in timeline for _, s, e in stage)
    return 1.0 - busy / (len(timeline) * (end - start))


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """Bubble as a fraction of total time: bubble/ideal = (p − 1)/(v·m), so (p−1)/(v·m + p − 1)."""
    return (p - 1) / (v * m + p - 1)


def peak_in_flight(schedule) -> list[int]:
    """Per stage: the most micro-batch chunks whose forward ran but whose backward has not."""
    peaks = []
    for stage in schedule:
        alive = peak = 0
        for a in stage:
            alive += 1 if a.kind == "F" else -1
            peak = max(peak, alive)
        peaks.append(peak)
    return peaks
