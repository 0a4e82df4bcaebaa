"""Ranks started by a harness of their own (spawned processes, init_process_group, training,
destroy_process_group) exit cleanly, run after run: no SIGABRT, no 'terminate called'.

A collective launched in another order on one rank (a parameter unused there) used to pair
buffers of different sizes: gloo aborts the process ('terminate called after throwing an instance
of gloo::EnforceNotMet ... Received data size doesn't match'), and only sometimes, when the sizes
happen to differ."""
import os
import subprocess
import sys

import pytest

from dpo_lab.paths import REPO_ROOT

pytestmark = pytest.mark.distributed
RUNS = 3  # each run is two fresh processes (seconds of start-up): kept short


def test_spawned_ranks_exit_cleanly_every_time():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "tests._dp_ranks", str(RUNS)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    codes = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("exitcodes")]
    assert proc.returncode == 0 and len(codes) == RUNS, proc.stderr[-3000:]
    assert all(c == ["0", "0"] for c in codes), (codes, proc.stderr[-3000:])
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
