"""The sharded trainer (FSDP2, :mod:`ppcl.distill.sharding`) against the unsharded one on the toy teacher.

For fp32 and bf16 autocast, trains the same 3-span add-on twice with :func:`ppcl.distill.distill_depth`, once plain
and once with ``shard=True``, and reports the largest weight difference and, on a GPU, the peak memory of each run.
In one process the sharded run makes its own one-rank group (NCCL on a GPU, gloo on a CPU), so this exercises the
sharded code path on CUDA: DTensor parameters on the device, NCCL all-gathers and reduce-scatters, the gather into
the add-on at checkpoints. It is a correctness check, not a speed-up: with one rank nothing is saved.

GPU (appends to benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/sharded_check.py --device cuda --json runs/sharded_check.json

CPU, a few steps (tests/test_sharded_check.py runs this)::

    .venv/bin/python benchmarks/sharded_check.py --device cpu --steps 3 --no-append
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis.intervals import Interval
from ppcl.api import plan_from_removed
from ppcl.distill import DistillConfig, distill_depth
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher

REMOVED = ((3, 4), (7, 8), (11, 12))
"""Inclusive runs of toy blocks whose spans are trained (three students)."""


def train(
    teacher: ToyTeacher, precision: str, shard: bool, steps: int, device: torch.device, out: Path
) -> tuple[dict[str, torch.Tensor], float, float | None, float]:
    """Train the add-on; returns its weights, how far training moved them (max abs), the peak device memory (GB, GPU
    only) and seconds per step."""
    model = teacher.transformer
    plan = plan_from_removed(
        [Interval(a, b, student=False) for a, b in REMOVED], type(model), model.config, protect_first=1, protect_last=1
    )
    addon = PruningAddon.from_plan(model, plan)
    start = {k: v.detach().float().cpu().clone() for k, v in addon.students.state_dict().items()}
    config = DistillConfig(
        steps=steps,
        lr=3e-4,
        warmup=1,
        batch_size=16,
        mixed_precision=precision,  # type: ignore[arg-type]
        checkpoint_every=max(1, steps // 2),
        log_every=1,
        shard=shard,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distill_depth(model, addon, ToyDistillData(teacher, 16, seed=0), config, out)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    seconds = float(addon.provenance["depth"]["seconds_per_step"])
    weights = {k: v.detach().float().cpu() for k, v in addon.students.state_dict().items()}
    moved = max((weights[k] - start[k]).abs().max().item() for k in weights)
    return weights, moved, peak, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both precisions, sharded then plain; the result rows."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = ToyTeacher.load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("no", "bf16"):
            # The sharded run starts from a teacher in host memory, as `ppcl distill` loads one, so fully_shard moves
            # each shard to the device; the plain run's session then moves the whole model there itself.
            teacher.transformer.to("cpu")
            sharded, _, peak_sharded, s_sharded = train(
                teacher, precision, True, args.steps, device, Path(tmp, precision + "-sharded")
            )
            plain, moved, peak_plain, s_plain = train(
                teacher, precision, False, args.steps, device, Path(tmp, precision)
            )
            rows.append(
                {
                    "precision": precision,
                    "max_abs_diff": max((plain[k] - sharded[k]).abs().max().item() for k in plain),
                    "weights_moved": moved,
                    "peak_gb_plain": peak_plain,
                    "peak_gb_sharded": peak_sharded,
                    "s_per_step_plain": s_plain,
                    "s_per_step_sharded": s_sharded,
                }
            )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "spans": [list(r) for r in REMOVED],
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    header = (
        "| precision | max weight difference sharded vs plain | max weight change by training | peak GB plain | "
        "peak GB sharded | s/step plain | s/step sharded |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        peaks = [f"{r[k]:.3f}" if r[k] is not None else "n/a" for k in ("peak_gb_plain", "peak_gb_sharded")]
        lines.append(
            f"| {r['precision']} | {r['max_abs_diff']:.2e} | {r['weights_moved']:.2e} | {peaks[0]} | "
            f"{peaks[1]} | {r['s_per_step_plain']:.4f} | {r['s_per_step_sharded']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the result here")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--append", action="store_true", help="append to RESULTS.md even on the CPU")
    group.add_argument("--no-append", action="store_true", help="never append to RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    table = format_table(result)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    on_gpu = result["device"] != "cpu"
    if args.append or (on_gpu and not args.no_append):
        append(
            f"Sharded (FSDP2) vs plain depth distillation, toy teacher, one process on {result['device']}",
            f"{args.steps} steps, batch 16, spans (inclusive removed runs) {result['spans']}; the sharded run "
            f"starts from the teacher in host memory.\n\n{table}\n",
        )
    return result


if __name__ == "__main__":
    main()
