"""Width pruning and fine-tune on the toy teacher, continuing the depth ladder (benchmarks/depth_ladder.py).

Starting from the depth ladder's non-sequential add-on (level ``--level``), adds: + text-stream runs (text CKA),
+ FFN → linear maps (lowest FFN linear-fit error), then a short end-to-end fine-tune of that final level. Each stage
gets the same number of steps. Rows: params, FLOPs and latency ratios, velocity agreement, ShapesEval and R.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis import RedundancyReport
from ppcl.distill import DistillConfig, distill_width, finetune
from ppcl.eval.levels import evaluate_levels, format_table
from ppcl.plan import PruningPlan, add_width_levels
from ppcl.plan.width import TextRun
from ppcl.plan.width_select import select_ffn_blocks, with_width_level
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher


def _config(args, steps: int) -> DistillConfig:
    return DistillConfig(
        steps=steps, lr=args.lr, batch_size=args.batch_size, warmup=max(1, steps // 20), checkpoint_every=0, seed=0
    )


def _width_plan(plan: PruningPlan, report: RedundancyReport, level: str, ffn_k: int) -> tuple[PruningPlan, str, str]:
    """Levels ``level+t`` (text runs) and ``level+w`` (text runs + FFN blocks) on top of depth level ``level``."""
    with_text = add_width_levels(plan, report, ffn_blocks=0, suffix="+t")
    text_level = f"{level}+t"
    runs = [(r.run.start, r.run.stop - 1) for r in with_text.replacements_of(text_level) if isinstance(r, TextRun)]
    kept = set(plan.kept_blocks(level))
    pruned = [j for a, b in runs for j in range(a + 1, b + 1)]
    ffns = select_ffn_blocks(report.ffn_rel_error, ffn_k, text_pruned=pruned, allowed=kept)
    full_level = f"{level}+w"
    return with_width_level(with_text, full_level, runs, ffns, base_level=level), text_level, full_level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ladder", default="runs/ladder", help="output folder of benchmarks/depth_ladder.py")
    parser.add_argument("--level", default="p50")
    parser.add_argument("--steps", type=int, default=600, help="steps per stage (width, fine-tune)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ffn-blocks", type=int, default=2)
    parser.add_argument("--per-category", type=int, default=60)
    args = parser.parse_args()
    ladder = Path(args.ladder)
    teacher = ToyTeacher.load()
    model = teacher.transformer
    report = RedundancyReport.load(ladder / "report")
    depth = PruningAddon.from_pretrained(ladder / "nonsequential" / "addon", model)
    plan, text_level, full_level = _width_plan(depth.plan, report, args.level, args.ffn_blocks)
    plan.save(ladder / "width_plan")
    addon = PruningAddon.from_plan(model, plan)
    addon.students.load_state_dict(depth.students.state_dict(), strict=False)  # the trained depth students
    data = ToyDistillData(teacher, args.batch_size, seed=0)
    batches = [ToyDistillData(teacher, 32, seed=12345).batch(i) for i in range(4)]
    known = json.loads((ladder / "results.json").read_text())["results"]["(a) no training"]["teacher"]["shapes_eval"]
    shapes = {"n_per_category": args.per_category}
    levels = [args.level, text_level, full_level]
    untrained = evaluate_levels(model, addon, batches, levels, 5, teacher, shapes, known)
    distill_width(model, addon, data, _config(args, args.steps), ladder / "width", level=full_level)
    trained = evaluate_levels(model, addon, batches, levels, 5, teacher, shapes, known)
    finetune(model, addon, data, _config(args, args.steps), ladder / "finetune", level=full_level)
    tuned = evaluate_levels(model, addon, batches, [full_level], 5, teacher, shapes, known)
    rows = [
        ("depth (c) non-sequential", args.level, trained[args.level]),
        ("+ width text, LS init only", text_level, untrained[text_level]),
        ("+ width text + FFN, LS init only", full_level, untrained[full_level]),
        ("+ width text, trained", text_level, trained[text_level]),
        ("+ width text + FFN, trained", full_level, trained[full_level]),
        ("+ fine-tune", full_level, tuned[full_level]),
    ]
    lines = [
        f"Plan: {plan.summary()}",
        "",
        "| stage | level | params | block params removed | FLOPs ratio | latency ratio | velocity cosine | "
        "ShapesEval overall | R |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, level, r in rows:
        lines.append(
            f"| {label} | {level} | {r['params'] / 1e6:.2f}M | {r['block_params_removed']:.1%} | "
            f"{r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['cosine']:.4f} | "
            f"{r['shapes_eval']['overall']:.3f} | {r['R']:.2%} |"
        )
    lines += [
        "",
        f"Width training {args.steps} steps (all projections of {full_level}, least-squares initialised "
        f"first), fine-tune {args.steps} steps (add-on parameters only), batch {args.batch_size}, lr {args.lr}.",
        "",
        "Full table after fine-tune:",
        "",
        format_table(tuned),
    ]
    (ladder / "width_results.json").write_text(
        json.dumps({"untrained": untrained, "trained": trained, "tuned": tuned}, indent=2)
    )
    append("Width pruning and fine-tune on the toy teacher (continuing the depth ladder)", "\n".join(lines))


if __name__ == "__main__":
    main()
