import os

# One thread per process keeps the 2-core CI box from oversubscribing when ranks and xdist workers
# run; set before anything imports torch (dpo_lab does), which reads it when it starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from dpo_lab.paths import build_dir  # noqa: E402

NOTEBOOK_OUT = build_dir() / "test"


@pytest.fixture(scope="session")
def run_nb():
    """run_nb(name) executes a notebook once per session (smoke profile) and returns
    {'seconds', 'notebook', 'figures'}; the executed copy stays in build/test/notebooks/."""
    from dpo_lab.quotes import check_smoke
    from dpo_lab.workbook import output_noise, run_notebook
    done = {}

    def _run(name):
        if name not in done:
            done[name] = run_notebook(name, "smoke", NOTEBOOK_OUT)
            # The numbers that lessons quote from this notebook's smoke run must still be what it gives.
            wrong = check_smoke(name, done[name]["figures"])
            assert not wrong, "lessons quote numbers the smoke run no longer gives:\n" + "\n".join(wrong)
            noise = output_noise(done[name]["notebook"])
            assert not noise, f"{name} printed library noise (fix the cause, or filter it narrowly):\n" + "\n".join(noise)
        return done[name]
    return _run


STUDENT_OUT = build_dir() / "test-student"


@pytest.fixture(scope="session")
def run_student_nb():
    """run_student_nb(name) writes the notebook's student version (solutions replaced by stubs),
    executes it (smoke profile) and returns its figures; outputs stay in build/test-student/."""
    from dpo_lab.exercises.student import write_student_versions
    from dpo_lab.workbook import output_noise, run_notebook
    done = {}

    def _run(name):
        if name not in done:
            write_student_versions([name], STUDENT_OUT / "src")
            res = run_notebook(name, "smoke", STUDENT_OUT, source_dir=STUDENT_OUT / "src")
            noise = output_noise(res["notebook"])
            assert not noise, f"the student version of {name} printed library noise:\n" + "\n".join(noise)
            done[name] = res["figures"]
        return done[name]
    return _run




def pytest_xdist_auto_num_workers(config):
    """`-n auto`: two workers more than the cores we may use. Much of the suite waits rather than
    computes (ranks starting, padded pipeline steps, a deadlocked student solution running into its
    time limit), so spare workers keep the cores busy (2 cores: 300 s with 3 workers, 260 s with 4)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 2
