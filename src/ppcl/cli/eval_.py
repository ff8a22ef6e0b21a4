"""``ppcl eval``: every level of an add-on against the teacher (params, latency, agreement, toy ShapesEval + R)."""

from __future__ import annotations

import argparse

from ppcl.cli.common import add_model_args, load_model


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("eval", help="per level: params, latency ratio, velocity agreement, ShapesEval + R (toy)")
    p.add_argument("--addon", required=True, help="PruningAddon folder")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--levels", default=None, help="comma-separated level names (default: all)")
    add_model_args(p)
    p.add_argument("--calibration", default=None, help="batches for agreement/latency (default toy: fresh data)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing repeats")
    p.add_argument("--no-shapes-eval", action="store_true", help="toy: skip ShapesEval")
    p.add_argument("--per-category", type=int, default=60, help="toy ShapesEval prompts per category")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.addon import PruningAddon
    from ppcl.eval.levels import evaluate_levels, format_table
    from ppcl.io import write_json

    model = load_model(args)
    addon = PruningAddon.from_pretrained(args.addon, model)
    toy = None
    if args.calibration is not None:
        from ppcl.data.calibration import CalibrationSet

        calibration = CalibrationSet.load(args.calibration)
        batches = list(calibration.batches(args.batch_size))[: args.batches]
    else:
        from ppcl.distill import ToyDistillData
        from ppcl.toy.teacher import ToyTeacher

        toy = ToyTeacher.load()
        data = ToyDistillData(toy, args.batch_size, seed=12345)
        batches = [data.batch(i) for i in range(args.batches)]
    levels = args.levels.split(",") if args.levels else None
    shapes = None if (toy is None or args.no_shapes_eval) else toy
    rows = evaluate_levels(model, addon, batches, levels, args.repeats, shapes, {"n_per_category": args.per_category})
    if args.out:
        write_json(rows, args.out)
    print(format_table(rows))
    return 0
