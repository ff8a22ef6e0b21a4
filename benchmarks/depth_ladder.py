"""Depth pruning on the committed toy teacher: no training vs sequential vs non-sequential distillation.

One plan from the analysis (nested levels ~25/40/50% of block parameters), the same steps and the same data for each
training mode. ShapesEval + R for (a) the spans' blocks dropped with no training (students = untrained copies of
their first block, i.e. blocks u+1..v simply removed), (b) sequential distillation (the paper's baseline), (c)
non-sequential distillation (the method), and the other pluggable levels of (c) without retraining.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, analyze
from ppcl.distill import DistillConfig, distill_depth
from ppcl.eval.levels import evaluate_levels, format_table
from ppcl.plan import plan_from_report
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher


def _train(teacher: ToyTeacher, plan, mode: str, args, out: Path) -> tuple[PruningAddon, dict]:
    addon = PruningAddon.from_plan(teacher.transformer, plan)
    config = DistillConfig(
        mode=mode,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup=max(1, args.steps // 20),
        checkpoint_every=0,
        seed=0,
    )
    data = ToyDistillData(teacher, args.batch_size, seed=0)
    t0 = time.perf_counter()
    distill_depth(teacher.transformer, addon, data, config, out / mode, level=args.level)
    depth = addon.provenance.get("depth", {})
    info = {
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_step": depth.get("seconds_per_step"),
        "teacher_forward_ratio": depth.get("teacher_forward_ratio"),
    }
    return addon, info


@torch.no_grad()
def _forward_seconds(model, batch: dict, repeats: int = 5) -> float:
    """Median wall time of one full teacher forward on ``batch``."""
    model(**batch, return_dict=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch, return_dict=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--targets", default="0.25,0.4,0.5")
    parser.add_argument("--level", default="p50", help="the level compared across modes")
    parser.add_argument("--protect", type=int, default=2, help="blocks protected at each end")
    parser.add_argument("--per-category", type=int, default=60, help="ShapesEval prompts per category (x2 seeds)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ppcl-ladder-"))
    teacher = ToyTeacher.load()
    model = teacher.transformer
    report = analyze(
        model, calibrate_toy(teacher), AnalysisConfig(protect_first=args.protect, protect_last=args.protect)
    )
    # A fixed-budget ladder: every target is met exactly as before the budget guard (guard_factor=0).
    plan = plan_from_report(report, model.config, [float(t) for t in args.targets.split(",")], guard_factor=0)
    plan.save(out / "plan")
    report.save(out / "report")
    batches = [ToyDistillData(teacher, 32, seed=12345).batch(i) for i in range(4)]
    shapes = {"n_per_category": args.per_category}
    results = {}
    untrained = PruningAddon.from_plan(model, plan)
    results["(a) no training"] = evaluate_levels(model, untrained, batches, [args.level], 5, teacher, shapes)
    known = results["(a) no training"]["teacher"]["shapes_eval"]
    timings = {}
    for mode, label in (("sequential", "(b) sequential"), ("nonsequential", "(c) non-sequential")):
        addon, timings[mode] = _train(teacher, plan, mode, args, out)
        levels = plan.level_names if mode == "nonsequential" else [args.level]
        results[label] = evaluate_levels(model, addon, batches, levels, 5, teacher, shapes, known)
    forward = _forward_seconds(model, ToyDistillData(teacher, args.batch_size, seed=0).batch(0))
    for t in timings.values():
        t["step_over_forward"] = round(t["seconds_per_step"] / forward, 2)
    (out / "results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    teacher_row = results["(c) non-sequential"]["teacher"]
    lines = [
        f"Plan (inclusive intervals, cheapest first): {[r.describe(plan.layout()) for r in plan.replacements]}",
        "",
        f"Teacher ShapesEval overall {teacher_row['shapes_eval']['overall']:.3f} "
        f"({teacher_row['shapes_eval']['n_images']} images).",
        "",
        "| variant | level | blocks | block params removed | velocity cosine | ShapesEval overall | R |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        for name, r in rows.items():
            if name == "teacher":
                continue
            lines.append(
                f"| {label} | {name} | {r['blocks']} | {r['block_params_removed']:.1%} | "
                f"{r['cosine']:.4f} | {r['shapes_eval']['overall']:.3f} | {r['R']:.2%} |"
            )
    lines += [
        "",
        f"Training: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, same data (seed 0) for "
        f"both modes. Wall time: " + ", ".join(f"{m} {t['seconds']} s" for m, t in timings.items()),
        f"One full teacher forward at batch {args.batch_size}: {forward * 1e3:.0f} ms. Distillation step time / "
        "teacher forward: "
        + ", ".join(f"{m} {t['step_over_forward']}x ({t['seconds_per_step']:.3f} s/step)" for m, t in timings.items()),
        "",
        "Full tables:",
        "",
    ]
    for label, rows in results.items():
        lines += [f"{label}:", "", format_table(rows), ""]
    append("Depth pruning ladder on the toy teacher", "\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
