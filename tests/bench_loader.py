"""Load a script of ``benchmarks/`` as a module, for the tests that run benchmarks at tiny size."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_module(filename: str) -> Iterator[ModuleType]:
    """``benchmarks/<filename>`` as a module while the context lasts.

    Its sibling imports (``_results``, ``real_size_latency``) need benchmarks/ on the path while it loads, and its
    dataclasses need the module registered in ``sys.modules`` while they are created.
    """
    name = "ppcl_bench_" + Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    try:
        yield module
    finally:
        sys.modules.pop(name, None)
