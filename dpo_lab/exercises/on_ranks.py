"""Running a student's function on real ranks, shared by the checks of notebooks 04 and 07.

The function runs in a thread of the rank (`call_on_rank`): if it is still blocked after STUCK_S
seconds, the check says in which call it waits (a deadlock), instead of waiting for the launcher's
timeout. `run_check` launches world sizes 2 and 3 (3 is odd: index mistakes that cancel modulo 2
show there) and raises the lowest rank's verdict.
"""
import os
import sys
import threading
import traceback

import torch
import torch.distributed as dist

from dpo_lab.exercises import Wrong

WORLD_SIZES = (2, 3)
STUCK_S = 10       # a ring over a few floats takes milliseconds: still blocked after 10 s = deadlock
LAUNCH_S = 120     # the launcher's hang guard, behind STUCK_S

_NOT_YOURS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules["dpo_lab"]))


# --- running the student's code on a rank ---------------------------------------------------------

def _stuck_message(thread: threading.Thread) -> str:
    """Where the student's code waits: its own line and the torch.distributed call it is in."""
    frames = traceback.extract_stack(sys._current_frames()[thread.ident])
    yours = [i for i, f in enumerate(frames)
             if not f.filename.startswith(_NOT_YOURS) and f.filename != threading.__file__]
    where, call, shown = "", "", ""
    if yours:
        f = frames[yours[-1]]
        where = f" (in {f.name}, line {f.lineno})"
        api = next((g for g in frames[yours[-1] + 1:] if g.name != "wrapper"), None)
        call = api.name if api else ""
        shown = f"dist.{call}" if api and "distributed_c10d" in api.filename else call
    head = f"still blocked in {shown or 'your function'}{where} after {STUCK_S}s: a deadlock"
    if call == "send":
        return (head + ". Every rank sends first, and a blocking dist.send waits for its receiver, "
                "who is sending too: use dist.isend/dist.irecv (or dist.batch_isend_irecv) and wait on "
                "both, or let even ranks send first and odd ranks receive first")
    if call == "recv":
        return (head + ". Every rank waits to receive before anyone sends: post the receive with "
                "dist.irecv, or pair it with the send in dist.batch_isend_irecv")
    if call == "wait":
        return (head + ": a request never completes; is every send matched by a receive of the same "
                "size on the peer (send to (rank + 1) % n, receive from (rank − 1) % n)?")
    return head + ": is a send missing its receive, or a collective called on some ranks only?"


def call_on_rank(fn, *args):
    """fn(*args) on this rank, all ranks starting together; Wrong if it is still blocked after
    STUCK_S. What fn raises is raised here (NotImplementedError included: 'not implemented yet')."""
    dist.barrier()
    box = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # raised again in the rank's main thread, traceback kept
            box["err"] = e
    thread = threading.Thread(target=run, daemon=True, name="student-code")
    thread.start()
    thread.join(STUCK_S)
    if thread.is_alive():
        raise Wrong(_stuck_message(thread))  # the launcher then stops the blocked ranks
    if "err" in box:
        raise box["err"]
    return box.get("out")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on some rank: all ranks stop after the same round."""
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item())


def run_check(rank_fn, fn):
    """Launch rank_fn(fn) at world sizes 2 and 3; raise the lowest rank's verdict, if any."""
    from dpo_lab.parallel import launch
    for n in WORLD_SIZES:
        verdicts = launch(rank_fn, n, args=(fn,), timeout=LAUNCH_S)
        bad = next((v for v in verdicts if v), None)
        if bad:
            raise Wrong(f"with {n} ranks, {bad}")


def verdict_of(compare) -> str | None:
    """Run a comparison that raises Wrong; its message, or None when it passes."""
    try:
        compare()
    except Wrong as e:
        return str(e)
    return None
