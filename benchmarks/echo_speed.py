"""Seconds per depth step against data echoing (``DistillConfig.teacher_reuse``) on the demo's plan and batch.

Builds the demo's plan from the committed toy teacher (same calibration, analysis and levels as ``ppcl demo``), then
times ``distill_depth`` for ``--steps`` steps at each ``--reuse`` value, interleaved over ``--repeats`` rounds so that
the machine's drift hits every value alike. Appends the median seconds per step and the speed-up over reuse 1 to
benchmarks/RESULTS.md. Quality per step is measured separately (benchmarks/depth_recipes.py --teacher-reuse).

    python benchmarks/echo_speed.py --steps 80 --reuse 1,2,4 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, analyze
from ppcl.demo import DemoConfig, make_plan
from ppcl.distill import DistillConfig, distill_depth
from ppcl.plan import PruningPlan
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher


def demo_plan(teacher: ToyTeacher, cfg: DemoConfig) -> PruningPlan:
    """The plan ``ppcl demo`` trains (its calibration, analysis and level rules)."""
    calibration = calibrate_toy(teacher, cfg.calib_prompts, n_timesteps=cfg.calib_timesteps)
    report = analyze(teacher.transformer, calibration, AnalysisConfig(seed=cfg.seed))
    return make_plan(report, teacher.transformer.config, cfg.ffn_blocks, cfg.width_base, cfg.text_cka_threshold)


def time_depth(teacher: ToyTeacher, plan: PruningPlan, cfg: DemoConfig, steps: int, reuse: int) -> float:
    """Seconds per step of one depth run of ``steps`` steps (the demo's chain mix, batch and lr)."""
    addon = PruningAddon.from_plan(teacher.transformer, plan, init=cfg.init)
    config = DistillConfig(
        steps=steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup=1,
        checkpoint_every=0,
        log_every=steps,
        chain_mix=cfg.chain_mix,
        teacher_reuse=reuse,
        seed=cfg.seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        distill_depth(
            teacher.transformer, addon, ToyDistillData(teacher, cfg.batch_size, seed=cfg.seed), config, Path(tmp)
        )
        return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--reuse", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, cfg = ToyTeacher.load(), DemoConfig.full()
    plan = demo_plan(teacher, cfg)
    values = [int(r) for r in args.reuse.split(",")]
    times: dict[int, list[float]] = {r: [] for r in values}
    for _ in range(args.repeats):
        for r in values:
            times[r].append(time_depth(teacher, plan, cfg, args.steps, r))
    base = float(np.median(times[values[0]]))
    lines = [
        "| teacher reuse | s/step (median) | runs | speed-up vs reuse " + str(values[0]) + " |",
        "|---|---|---|---|",
    ]
    for r in values:
        med = float(np.median(times[r]))
        lines.append(f"| {r} | {med:.3f} | {', '.join(f'{t:.3f}' for t in times[r])} | {base / med:.2f}x |")
    body = (
        f"Depth stage of the demo's plan (3 spans + the demo's chain mix {cfg.chain_mix:g}), batch "
        f"{cfg.batch_size}, {args.steps} steps per run, torch threads {args.threads}, {args.repeats} interleaved "
        "rounds.\n\n" + "\n".join(lines)
    )
    print(body)
    append("Data echoing: seconds per depth step (toy demo plan)", body)


if __name__ == "__main__":
    main()
