"""The demo's per-level tables into benchmarks/RESULTS.md: params, FLOPs, latency, raw velocity agreement, guided
agreement (guided-velocity NMSE, guidance-direction NMSE and cosine), image PSNR to the teacher at equal seeds,
ShapesEval (robust and strict overall, per category), R, and the x0-prediction NMSE per time bucket.

Either runs ``ppcl demo`` (the full preset; budgets overridable) into ``--out``, or, with ``--from-run DIR``, formats a
run that already finished (its ``results.json`` records the command that made it). Usage::

    python benchmarks/demo_levels.py --out runs/demo                        # runs the README's demo, then appends
    python benchmarks/demo_levels.py --out runs/demo-long --depth-steps 2400 --finetune-steps 2400
    python benchmarks/demo_levels.py --from-run ppcl-demo                   # a finished `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from _results import append
from ppcl.demo import DemoConfig, run_demo
from ppcl.demo.report import level_table, x0_table


def body(results: dict[str, Any]) -> str:
    """The RESULTS.md section of one finished run."""
    header, rows = level_table(results["levels"])
    cfg = results["config"]
    lines = [
        (
            f"Demo run: `{results.get('command', 'ppcl demo')}`, torch threads {results.get('threads', '?')}; "
            f"budgets: depth {cfg['depth_steps']}, width {cfg['width_steps']}, fine-tune {cfg['finetune_steps']} "
            f"steps at batch {cfg['batch_size']}, lr {cfg['lr']}; ShapesEval {cfg['per_category']} prompts per "
            "category x 2 seeds per level."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    x0_header, x0_rows = x0_table(results["levels"])
    if x0_header:  # runs from before the guided metrics have none
        lines += [
            "",
            "x0-prediction NMSE vs the teacher per time bucket (guided velocity, g = 4; x̂0 = x_t − t·v_g):",
            "",
            "| " + " | ".join(x0_header) + " |",
            "|" + "---|" * len(x0_header),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in x0_rows]
    levels = [k for k in results["stages"][0] if k != "stage"]
    lines += [
        "",
        "Velocity cosine of every level after each stage (held-out batches):",
        "",
        "| after stage | " + " | ".join(levels) + " |",
        "|" + "---|" * (len(levels) + 1),
    ]
    lines += [f"| {s['stage']} | " + " | ".join(f"{s[lv]:.4f}" for lv in levels) + " |" for s in results["stages"]]
    lines += [
        "",
        "Plan:",
        "",
        "```",
        results["plan"],
        "```",
        "",
        "Wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items()) + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--from-run", default=None, help="format this finished run instead of running the demo")
    parser.add_argument("--depth-steps", type=int, default=None)
    parser.add_argument("--width-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--per-category", type=int, default=None)
    parser.add_argument("--title", default="ppcl demo: every level of one training (toy teacher)")
    args = parser.parse_args()
    if args.from_run:
        results = json.loads((Path(args.from_run) / "results.json").read_text())
    else:
        overrides = {
            k: v
            for k, v in vars(args).items()
            if k in ("depth_steps", "width_steps", "finetune_steps", "per_category") and v is not None
        }
        out = Path(args.out)
        run_demo(out, DemoConfig.full(**overrides), command="python benchmarks/demo_levels.py (run_demo)")
        results = json.loads((out / "results.json").read_text())
    results.setdefault("threads", os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    append(args.title, body(results))


if __name__ == "__main__":
    main()
