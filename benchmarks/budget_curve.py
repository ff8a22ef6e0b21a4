"""What quality costs: R of every demo level against wall time, at multiples of the demo's training budget.

Runs the whole demo (``ppcl.demo.run_demo``, the full preset: same plan, data and evaluation) with its three training
budgets (depth, width, fine-tune steps) multiplied by each of ``--multipliers``, and appends one table to
benchmarks/RESULTS.md: per multiplier, the demo's wall time and, per level, R (robust ShapesEval), the strict R and
the guided-velocity NMSE. A user reads from it where R ≤ 3% is reached at ≥ 40% of block parameters removed, or how
far it is at the largest budget run. ``--per-category`` evaluates more images than the demo's 200 per level (R's
binomial noise at 200 images is several points; the training is the same). Each multiplier is a separate run folder under ``--out``; a folder that already
holds a finished run (``results.json``) is read, not re-run, so the curve can be extended later.

    python benchmarks/budget_curve.py --multipliers 1,2,4 --out runs/budget
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _results import append
from ppcl.demo import DemoConfig, run_demo
from ppcl.eval.levels import TEACHER

TRAINING_STAGES = ("depth", "width", "fine-tune")


def run_one(out: Path, multiplier: float, per_category: int | None = None) -> dict[str, Any]:
    """The results of the demo at ``multiplier`` x its budgets (run unless ``out`` holds them)."""
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    base = DemoConfig.full()
    cfg = DemoConfig.full(
        depth_steps=round(base.depth_steps * multiplier),
        width_steps=round(base.width_steps * multiplier),
        finetune_steps=round(base.finetune_steps * multiplier),
        per_category=per_category or base.per_category,
    )
    run_demo(out, cfg, command=f"python benchmarks/budget_curve.py (run_demo x{multiplier:g})")
    return json.loads((out / "results.json").read_text())


def _strict_r(level: dict[str, Any], teacher: dict[str, Any]) -> float | None:
    strict, ref = level.get("shapes_eval", {}).get("strict"), teacher.get("shapes_eval", {}).get("strict")
    if not strict or not ref:
        return None
    cats = [c for c in ("single", "two_objects", "position", "color") if ref.get(c)]
    return sum(max(0.0, (ref[c] - strict[c]) / ref[c]) for c in cats) / len(cats)


def training_minutes(timings: dict[str, float]) -> float:
    """Minutes of the three training stages (the part of the wall time the budget multiplies)."""
    return sum(s for name, s in timings.items() if name.startswith(TRAINING_STAGES)) / 60


def table(runs: dict[float, dict[str, Any]]) -> str:
    levels = [k for k in next(iter(runs.values()))["levels"] if k != TEACHER]
    head = (
        "| budget | steps depth/width/ft | training min | wall min | images per level | "
        + " | ".join(f"{lv} R | {lv} strict R | {lv} guided NMSE" for lv in levels)
        + " |"
    )
    lines = [head, "|---" * (5 + 3 * len(levels)) + "|"]
    for mult, res in runs.items():
        cfg, rows = res["config"], res["levels"]
        cells = []
        for lv in levels:
            strict = _strict_r(rows[lv], rows[TEACHER])
            cells += [
                f"{rows[lv]['R']:.1%}",
                "—" if strict is None else f"{strict:.1%}",
                f"{rows[lv].get('guided_nmse', float('nan')):.3f}",
            ]
        lines.append(
            f"| x{mult:g} | {cfg['depth_steps']}/{cfg['width_steps']}/{cfg['finetune_steps']} | "
            f"{training_minutes(res['timings']):.1f} | {res['timings']['total'] / 60:.1f} | "
            f"{8 * cfg['per_category']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multipliers", default="1,2,4")
    parser.add_argument("--out", default="runs/budget")
    parser.add_argument(
        "--per-category",
        type=int,
        default=None,
        help="ShapesEval prompts per category (x2 seeds, 4 categories); default the demo's",
    )
    args = parser.parse_args()
    runs = {}
    for mult in (float(m) for m in args.multipliers.split(",")):
        runs[mult] = run_one(Path(args.out) / f"x{mult:g}", mult, args.per_category)
    body = (
        "The demo (full preset) at multiples of its training budgets; R on the robust ShapesEval, strict R on "
        "the strict one; training min: the three training stages; wall min: the whole `run_demo` (calibration, "
        "analysis and evaluation at the images per level shown included).\n\n" + table(runs)
    )
    print(body)
    append("Budget curve: R of every demo level vs training budget (toy teacher)", body)


if __name__ == "__main__":
    main()
