"""The ``ppcl`` command: verbs, output files, and how errors reach the user."""

from __future__ import annotations

import json
import subprocess
import sys

from ppcl.cli.main import main


def test_ground_truth_eval_writes_the_documented_keys(tmp_path):
    out = tmp_path / "gt.json"
    assert main(["-q", "toy", "eval", "--ground-truth", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"overall", "single", "two_objects", "position", "color", "n_images"}
    assert result["n_images"] >= 500 and result["overall"] == 1.0


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppcl", "toy", "eval", "--per-category", "0", "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppcl: error:")
    assert "Expected:" in lines[0] and "Found:" in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bad_caption_is_rejected_before_sampling(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["-q", "toy", "sample", "--prompt", "a purple blob", "--out", str(out)]) == 2
    assert not out.exists()
