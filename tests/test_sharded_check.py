"""benchmarks/sharded_check.py on the CPU for a few steps: the sharded trainer matches the plain one on the toy
teacher in fp32 and bf16, and the training really moved the weights (so equality is not two untouched copies)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_sharded_check_runs_and_matches(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("ppcl_bench_sharded_check", BENCHMARKS / "sharded_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # its `_results` import
    try:
        spec.loader.exec_module(module)
        module.main(["--device", "cpu", "--steps", "2", "--no-append", "--json", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(BENCHMARKS))
    result = json.loads((tmp_path / "r.json").read_text())
    assert [row["precision"] for row in result["rows"]] == ["no", "bf16"]
    for row in result["rows"]:
        assert row["max_abs_diff"] <= 1e-6 and row["weights_moved"] > 1e-5, row
        assert row["peak_gb_plain"] is None and row["s_per_step_sharded"] > 0
