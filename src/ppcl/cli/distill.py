"""``ppcl distill``: plan + data → trained PruningAddon (non-sequential depth distillation by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppcl.cli.common import add_model_args, load_model
from ppcl.logging import get_logger

log = get_logger("cli.distill")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("distill", help="train the students of a plan → add-on (OUT/addon)")
    p.add_argument("--plan", required=True, help="PruningPlan folder or plan.json")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoint/, addon/")
    add_model_args(p)
    p.add_argument("--calibration", default=None,
                   help="train on a CalibrationSet (default for the toy: fresh ShapesWorld batches)")
    p.add_argument("--mode", choices=("nonsequential", "sequential"), default="nonsequential")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--init", choices=("first", "middle", "last"), default=None, help="override the plan's init")
    p.add_argument("--level", default=None, help="train only this level's spans")
    p.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"), default="uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.addon import PruningAddon
    from ppcl.distill import DistillConfig, distill_depth
    from ppcl.plan import PruningPlan

    plan = PruningPlan.load(args.plan)
    model = load_model(args)
    addon = PruningAddon.from_plan(model, plan, init=args.init)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    config = DistillConfig(mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup=warmup,
                           mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                           gradient_accumulation=args.gradient_accumulation, checkpoint_every=args.checkpoint_every,
                           seed=args.seed)
    data = _data(args, model)
    distill_depth(model, addon, data, config, args.out, resume=args.resume, level=args.level)
    print(Path(args.out) / "addon")
    return 0


def _data(args: argparse.Namespace, model):
    from ppcl.distill import CalibrationData, ToyDistillData

    if args.calibration is not None:
        from ppcl.data.calibration import CalibrationSet

        calibration = CalibrationSet.load(args.calibration)
        calibration.check_model(model)
        return CalibrationData(calibration, args.batch_size, args.seed)
    if args.model is not None:
        from ppcl.errors import ConfigError

        raise ConfigError("no training data for a real model", expected="--calibration DIR",
                          found="none", fix="capture inputs with `ppcl calibrate --pipeline ...` first")
    from ppcl.toy.teacher import ToyTeacher

    return ToyDistillData(ToyTeacher.load(), args.batch_size, args.seed, args.timestep_sampling)
