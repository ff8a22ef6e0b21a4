"""benchmarks/sharded_check.py on the CPU for a few steps: the sharded trainer matches the plain one on the toy
teacher in fp32 and bf16, and the training really moved the weights (so equality is not two untouched copies)."""

from __future__ import annotations

import json
from pathlib import Path

from bench_loader import benchmark_module


def test_sharded_check_runs_and_matches(tmp_path: Path) -> None:
    with benchmark_module("sharded_check.py") as module:
        module.main(["--device", "cpu", "--steps", "2", "--no-append", "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert [row["precision"] for row in result["rows"]] == ["no", "bf16"]
    for row in result["rows"]:
        assert row["max_abs_diff"] <= 1e-6 and row["weights_moved"] > 1e-5, row
        assert row["peak_gb_plain"] is None and row["s_per_step_sharded"] > 0
