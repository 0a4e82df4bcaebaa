"""Simulate a CPU without AVX512-BF16 for bitsandbytes, in every Python process.

    PYTHONPATH=tests/cpu_without_avx512bf16 make test     # or: bash .ci/run

bitsandbytes asks its native library once, at import, whether the CPU has AVX512-BF16, and picks
its CPU kernels from the answer. Python imports this file at start-up (it is `sitecustomize` on
PYTHONPATH, inherited by spawned ranks and notebook kernels); it makes that answer "no" right after
`bitsandbytes.functional` is loaded, before any module of bitsandbytes reads it.
"""
import importlib.abc
import importlib.machinery
import sys

TARGET = "bitsandbytes.functional"


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.has_avx512bf16 = lambda: False
        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _PatchAfterLoad())
