"""Rank functions that die in the ways a real rank dies (spawned ranks need an importable module)."""
import os
import signal
import time

import torch.distributed as dist


def exit_on_rank(bad_rank, code):
    """`bad_rank` leaves without a word (as an OOM-killed or os._exit-ing process does); the
    others wait for it in a barrier, where gloo reports a reset connection."""
    if dist.get_rank() == bad_rank:
        os._exit(code)
    dist.barrier()
    return dist.get_rank()


def slow_death_on_rank(bad_rank, code, linger):
    """`bad_rank` drops its connections, lingers `linger` s, then exits: its peers' errors reach
    the launcher before its death does (as when the kernel tears down a big OOM-killed process)."""
    if dist.get_rank() == bad_rank:
        dist.destroy_process_group()
        time.sleep(linger)
        os._exit(code)
    dist.barrier()
    return dist.get_rank()


def sigkill_on_rank(bad_rank):
    if dist.get_rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return dist.get_rank()


def silent_exit_on_rank(bad_rank):
    """`bad_rank` exits 0 without reporting while the others return normally (no barrier, so
    nothing else fails: only the launcher can notice)."""
    if dist.get_rank() == bad_rank:
        os._exit(0)
    return dist.get_rank()


def abort_at_exit_on_rank(bad_rank):
    """Returns normally, then aborts while the process exits (as a C++ `terminate called
    without an active exception` does)."""
    # multiprocessing runs its exit finalizers after the target returns, under spawn and forkserver
    # alike (a forkserver child leaves with os._exit, so atexit would never run).
    from multiprocessing import util
    if dist.get_rank() == bad_rank:
        util.Finalize(None, os.abort, exitpriority=0)
    return dist.get_rank()
