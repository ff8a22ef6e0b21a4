"""The ``ppcl`` command: verbs, output files, and how errors reach the user."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from ppcl.cli.main import main


def test_ground_truth_eval_writes_the_documented_keys(tmp_path):
    out = tmp_path / "gt.json"
    assert main(["-q", "toy", "eval", "--ground-truth", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"overall", "single", "two_objects", "position", "color", "n_images"}
    assert set(result) == keys | {"strict"} and set(result["strict"]) == keys  # robust on top, strict beside
    assert result["n_images"] >= 500 and result["overall"] == 1.0 and result["strict"]["overall"] == 1.0


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppcl", "toy", "eval", "--per-category", "0", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=120,
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


def test_calibrate_analyze_plan_on_the_toy_teacher(tmp_path):
    cal, rep, plan = tmp_path / "cal", tmp_path / "rep", tmp_path / "plan"
    assert main(["-q", "calibrate", "--out", str(cal), "--num-prompts", "8", "--timesteps", "3"]) == 0
    assert main(["-q", "analyze", "--calibration", str(cal), "--out", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["kind"] == "ppcl.RedundancyReport" and len(report["per_block"]["probe_rel_error"]["image"]) == 16
    assert (rep / "report.md").is_file() and (rep / "plots" / "depth_axis.png").is_file()
    assert (rep / "plan" / "plan.json").is_file()
    # On this calibration the b2 level already removes 4 blocks: a b4 level would be identical, so it is dropped.
    assert (
        main(["-q", "plan", "--report", str(rep), "--out", str(plan), "--targets", "2,4,5", "--target-kind", "blocks"])
        == 0
    )
    written = json.loads((plan / "plan.json").read_text())
    assert [lv["name"] for lv in written["levels"]] == ["b2", "b5"]
    assert any(note.startswith("level b4 ") and "dropped" in note for note in written["notes"])
    assert main(["-q", "plan", "--validate", str(plan)]) == 0


def test_analyze_refuses_a_missing_calibration(tmp_path):
    assert main(["-q", "analyze", "--calibration", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_distill_eval_merge_inspect_on_the_toy_teacher(tmp_path, capsys):
    from diffusers import QwenImageTransformer2DModel

    cal, rep, run, merged = (tmp_path / n for n in ("cal", "rep", "run", "merged"))
    assert main(["-q", "calibrate", "--out", str(cal), "--num-prompts", "4", "--timesteps", "2"]) == 0
    assert (
        main(
            [
                "-q",
                "analyze",
                "--calibration",
                str(cal),
                "--out",
                str(rep),
                "--targets",
                "2,4",
                "--target-kind",
                "blocks",
            ]
        )
        == 0
    )
    assert (
        main(["-q", "distill", "--plan", str(rep / "plan"), "--out", str(run), "--steps", "3", "--batch-size", "4"])
        == 0
    )
    assert (run / "addon" / "ppcl_addon.json").is_file() and (run / "metrics.jsonl").is_file()
    # --shard (FSDP2 over a one-process group here) trains the same weights; sequential mode cannot be sharded.
    sharded = tmp_path / "sharded"
    assert (
        main(
            [
                "-q",
                "distill",
                "--plan",
                str(rep / "plan"),
                "--out",
                str(sharded),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--shard",
            ]
        )
        == 0
    )
    want, got = (load_file(str(r / "addon" / "ppcl_addon.safetensors")) for r in (run, sharded))
    assert want.keys() == got.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    assert (
        main(
            [
                "-q",
                "distill",
                "--plan",
                str(rep / "plan"),
                "--out",
                str(tmp_path / "seq"),
                "--steps",
                "3",
                "--mode",
                "sequential",
                "--shard",
            ]
        )
        == 2
    )
    assert not (tmp_path / "seq").exists()
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "--addon",
                str(run / "addon"),
                "--out",
                str(out),
                "--repeats",
                "2",
                "--batches",
                "1",
                "--batch-size",
                "4",
                "--per-category",
                "1",
                "--psnr-per-category",
                "1",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert rows["teacher"]["guided_nmse"] == 0 and rows["b4"]["guided_nmse"] > 0 and rows["b4"]["psnr_db"] > 0
    assert len(rows["b4"]["x0_nmse"]) == 4
    assert list(rows) == ["teacher", "b2", "b4"]
    assert rows["b4"]["blocks"] < rows["b2"]["blocks"] < rows["teacher"]["blocks"] == 16
    assert rows["teacher"]["R"] == 0 and "overall" in rows["b4"]["shapes_eval"]
    assert rows["teacher"]["flops_ratio"] == 1 and 0 < rows["b4"]["flops_ratio"] < rows["b2"]["flops_ratio"] < 1
    assert main(["-q", "merge", "--addon", str(run / "addon"), "--level", "b4", "--out", str(merged)]) == 0
    stock = QwenImageTransformer2DModel.from_pretrained(str(merged), local_files_only=True)
    assert stock.config.num_layers == rows["b4"]["blocks"]
    capsys.readouterr()
    assert main(["inspect", str(run / "addon"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1
    assert main(["inspect", str(tmp_path)]) == 2


def test_bad_budget_fails_before_any_output(tmp_path):
    cal = tmp_path / "cal"
    assert main(["-q", "calibrate", "--out", str(cal), "--num-prompts", "2", "--timesteps", "1"]) == 0
    assert main(["-q", "analyze", "--calibration", str(cal), "--out", str(tmp_path / "rep"), "--targets", "abc"]) == 2
    assert not (tmp_path / "rep").exists()
    assert main(["-q", "calibrate", "--out", str(tmp_path / "c2"), "--seeds", "x"]) == 2
    assert not (tmp_path / "c2").exists()
