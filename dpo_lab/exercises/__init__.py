"""Graded exercises: the student writes the core function in a notebook cell, `check` grades it.

In a notebook, an exercise is a solution cell and a check cell:

    def ring_reduce_scatter(x, rank, world_size):
        ### BEGIN SOLUTION
        ...                                        # the workbook's solution
        ### END SOLUTION

    check("04.1", ring_reduce_scatter)           # one line: pass, what is wrong, or not implemented yet

The markers are nbgrader's: `nbgrader generate_assignment` or `dpo-lab student` replace each
solution by a stub that raises NotImplementedError, which the check reports as "not implemented
yet". Each check lives in `dpo_lab/exercises/nbNN.py` as an `@exercise("NN.k", "title")` function:
it compares the student's function with the twin that the lesson already trusts (the library
version, on real ranks when the topic is distributed) and raises `Wrong("what to fix")`.
A check never hangs (a time limit here, the launcher's timeout on ranks) and never raises into the
notebook: whatever the student's code does, `check` prints one line and returns a `Result`.
"""
import contextlib
import importlib
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

STUB = 'raise NotImplementedError("not implemented yet")'


class Wrong(AssertionError):
    """A check's verdict on a wrong solution: one line that a student can act on."""


class TookTooLong(Exception):
    pass


@dataclass
class Exercise:
    id: str          # "NN.k": notebook NN, exercise k
    title: str
    check: Callable  # check(student_fn) -> None, raises Wrong
    timeout: float   # seconds, for checks that run in this process


_REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, title: str, timeout: float = 120):
    """Register a check: `@exercise("04.1", "ring reduce-scatter")` over `def check(fn): ...`."""
    def register(check):
        _REGISTRY[id] = Exercise(id, title, check, timeout)
        return check
    return register


def _notebook_module(nb: str):
    try:
        return importlib.import_module(f"dpo_lab.exercises.nb{nb}")
    except ModuleNotFoundError as e:
        if e.name != f"dpo_lab.exercises.nb{nb}":
            raise
        return None


def exercises_of(nb: str) -> list[Exercise]:
    """The exercises of notebook `nb` ("04"), in order."""
    _notebook_module(nb)
    return sorted((e for i, e in _REGISTRY.items() if i.split(".")[0] == nb),
                  key=lambda e: int(e.id.split(".")[1]))


def get(id: str) -> Exercise:
    nb = id.split(".")[0]
    _notebook_module(nb)
    if id not in _REGISTRY:
        have = ", ".join(e.id for e in exercises_of(nb)) or "none"
        raise KeyError(f"no exercise {id!r}; notebook {nb} has: {have}")
    return _REGISTRY[id]


@dataclass
class Result:
    id: str
    title: str
    status: str   # "pass", "fail" or "todo"
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def __str__(self):
        head = f"exercise {self.id} ({self.title}):"
        if self.status == "pass":
            return f"✅ {head} pass"
        if self.status == "todo":
            return f"⏳ {head} not implemented yet"
        return f"❌ {head} {self.message}"


RESULTS: dict[str, Result] = {}  # the latest result of each exercise checked in this process


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TookTooLong after `seconds` (SIGALRM: main thread of a POSIX process, as in a
    notebook kernel; elsewhere no limit, and distributed checks rely on the launcher's timeout)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise TookTooLong()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else tb


def _rank_verdict(exc) -> tuple[str, str]:
    """Map a rank's failure (the launcher's RankFailed / RankTimeout) to a verdict."""
    from dpo_lab.parallel import RankFailed, RankTimeout
    if isinstance(exc, RankTimeout):
        return "fail", (f"rank(s) {exc.pending} never finished within {exc.timeout:.0f}s: is a send "
                        "missing its receive, or a collective called on some ranks only?")
    assert isinstance(exc, RankFailed)
    tb = exc.traceback or ""
    if "NotImplementedError" in tb:
        return "todo", ""
    last = _last_line(tb)
    if ".Wrong: " in last or last.startswith("Wrong: "):
        message = last.split("Wrong: ", 1)[1]
        return "fail", message if message.startswith("rank ") else f"rank {exc.rank}: {message}"
    if any(s in tb for s in ("Connection closed by peer", "Connection reset by peer", "connectFullMesh")):
        # gloo's words for "the peer you wait for has gone": it finished without this collective.
        return "fail", (f"rank {exc.rank} waited for a peer that had already finished: is a collective "
                        "(or a send/recv) called on some ranks only, or a different number of times?")
    if exc.exitcode is not None and not tb:
        return "fail", f"rank {exc.rank} died ({exc})"
    return "fail", f"rank {exc.rank} raised {last}"


def _your_line(exc: BaseException) -> str:
    """Where in the student's code an exception came from (their cell, not the package)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "dpo_lab" not in f.filename
              and "site-packages" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (in {f.name}, line {f.lineno}: {f.line})" if f.line else f" (in {f.name})"


def grade(ex: Exercise, fn) -> Result:
    """Run `ex`'s check on `fn` and return the verdict; never raises (except KeyboardInterrupt)."""
    from dpo_lab.parallel import RankFailed, RankTimeout
    if not callable(fn):
        return Result(ex.id, ex.title, "fail", f"expected a function, got {type(fn).__name__}")
    status, message = "pass", ""
    try:
        with time_limit(ex.timeout), torch.random.fork_rng():  # the notebook's RNG stream is untouched
            ex.check(fn)
    except NotImplementedError:
        status = "todo"
    except Wrong as e:
        status, message = "fail", str(e)
    except TookTooLong:
        status, message = "fail", f"took longer than {ex.timeout:.0f}s: an endless loop?"
    except (RankFailed, RankTimeout) as e:
        status, message = _rank_verdict(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the student's code raised: say what and where, keep the kernel alive
        status, message = "fail", f"your function raised {type(e).__name__}: {e}{_your_line(e)}"
    return Result(ex.id, ex.title, status, message)


def check(id: str, fn) -> None:
    """Grade the student's `fn` for exercise `id` and print one line (the verdict is kept in
    RESULTS[id]; nothing is returned, so a check cell shows that line and nothing else)."""
    result = grade(get(id), fn)
    RESULTS[id] = result
    print(result)


def summary(nb: str) -> dict:
    """Figures for notebook `nb`: how many of its exercises were checked, passed, or are stubs."""
    mine = [r for i, r in RESULTS.items() if i.split(".")[0] == nb]
    return {"exercises_checked": len(mine),
            "exercises_passed": sum(r.status == "pass" for r in mine),
            "exercises_todo": sum(r.status == "todo" for r in mine),
            "exercises_registered": len(exercises_of(nb))}


# --- helpers for writing checks -------------------------------------------------------------------

def expect_close(got, want, what: str, atol: float = 1e-5, rtol: float = 1e-5, hints: dict | None = None):
    """Raise Wrong unless `got` equals `want` within tolerance. When `got` is `want` times a
    constant factor, say so, with the hint for that factor if one is given
    (e.g. hints={2: "did you divide by world_size after the reduce?"})."""
    got_t = torch.as_tensor(got, dtype=torch.float64) if not torch.is_tensor(got) else got.detach().double()
    want_t = torch.as_tensor(want, dtype=torch.float64) if not torch.is_tensor(want) else want.detach().double()
    if got_t.shape != want_t.shape:
        raise Wrong(f"{what} has shape {tuple(got_t.shape)}, expected {tuple(want_t.shape)}")
    if not torch.isfinite(got_t).all():
        raise Wrong(f"{what} contains NaN or inf")
    if torch.allclose(got_t, want_t, atol=atol, rtol=rtol):
        return
    factor = scale_factor(got_t, want_t)
    if factor is not None:
        hint = (hints or {}).get(factor, "")
        raise Wrong(f"{what} is {factor:g}× the expected value" + (f": {hint}" if hint else ""))
    err = (got_t - want_t).abs().max().item()
    raise Wrong(f"{what} differs from the expected value by up to {err:.3g}"
                + (f" (e.g. got {got_t.flatten()[0].item():.6g}, expected {want_t.flatten()[0].item():.6g})"
                   if got_t.numel() > 0 else ""))


def scale_factor(got: torch.Tensor, want: torch.Tensor, candidates=(-1, 2, 3, 4, 0.5, 1 / 3, 0.25)):
    """The constant c (among `candidates`) with got == c * want, if there is one."""
    if want.abs().max() == 0:
        return None
    for c in candidates:
        if torch.allclose(got, c * want, atol=1e-6, rtol=1e-4):
            return round(c, 6)
    return None
