"""Realistic wrong solutions, each fed to its exercise's check by tests/test_exercises.py.

One module per notebook. Each mistake is a function decorated `@wrong("NN.k", "diagnosis")`: the
check must fail it with a message containing that diagnosis. They live here, not in the notebooks, so
the student versions never show them.
"""
WRONG = []  # (exercise id, expected diagnosis, function), filled by @wrong


def wrong(id: str, diagnosis: str):
    def register(fn):
        WRONG.append((id, diagnosis, fn))
        return fn
    return register


def cases(notebooks):
    """(id, diagnosis, function) of the wrong solutions of the given notebooks ("04", ...), imported on demand."""
    import importlib
    for nb in notebooks:
        importlib.import_module(f"tests.wrong_solutions.nb{nb}")
    return [c for c in WRONG if c[0].split(".")[0] in notebooks]


def case_id(case) -> str:
    return f"{case[0]}-{case[2].__name__}"
