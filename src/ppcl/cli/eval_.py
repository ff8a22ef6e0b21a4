"""``ppcl eval``: every level of an add-on against the teacher (params, latency, raw and guided agreement, toy PSNR,
ShapesEval + R)."""

from __future__ import annotations

import argparse

from ppcl.cli.common import add_model_args, add_overwrite_arg, check_out, load_model, require_positive


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "eval", help="per level: params, latency ratio, raw and guided velocity agreement, PSNR, ShapesEval + R (toy)"
    )
    p.add_argument("--addon", required=True, help="PruningAddon folder (or a Hub id in the local cache)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--levels", default=None, help="comma-separated level names (default: all)")
    add_model_args(p)
    p.add_argument("--calibration", default=None, help="batches for agreement/latency (default toy: fresh data)")
    p.add_argument("--batches", type=int, default=4, help="batches for agreement and latency")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing repeats")
    p.add_argument("--no-shapes-eval", action="store_true", help="toy: skip the sampled metrics (ShapesEval, PSNR)")
    p.add_argument("--per-category", type=int, default=60, help="toy ShapesEval prompts per category")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance g of the guided metrics and the sampled images (ShapesEval, "
        "PSNR) (default: the toy sampler's, 4.0)",
    )
    p.add_argument(
        "--psnr-per-category",
        type=int,
        default=4,
        help="toy: 0 skips the PSNR; any other value takes it on every ShapesEval image pair "
        "(teacher and level at equal prompts and noise, no extra sampling)",
    )
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.addon import PruningAddon
    from ppcl.errors import ConfigError
    from ppcl.eval.levels import DEFAULT_GUIDANCE, evaluate_levels, format_table
    from ppcl.eval.metrics import T_BUCKETS
    from ppcl.io import write_json

    if args.psnr_per_category < 0:
        raise ConfigError(
            "--psnr-per-category must not be negative",
            expected=">= 0 (0 skips the PSNR)",
            found=str(args.psnr_per_category),
        )
    require_positive(args, "batches", "batch_size", "repeats", "per_category")
    if args.out:
        from ppcl.outputs import JSON_RESULTS

        check_out(args, JSON_RESULTS, args.addon, args.model, args.calibration)
    model = load_model(args)
    addon = PruningAddon.from_pretrained(args.addon, model)
    toy, paired = None, None
    if args.calibration is not None:
        from ppcl.data.calibration import CalibrationSet

        calibration = CalibrationSet.load(args.calibration)
        batches = list(calibration.batches(args.batch_size))[: args.batches]
    else:
        from ppcl.eval.guided import paired_toy_batches
        from ppcl.toy.distill_data import ToyDistillData
        from ppcl.toy.teacher import ToyTeacher

        toy = ToyTeacher.load()
        data = ToyDistillData(toy, args.batch_size, seed=12345)
        batches = [data.batch(i) for i in range(args.batches)]
        # Captioned twins for the guided metrics, at least one sample per time bucket (a calibration set has no
        # empty-prompt embedding, so real models get them only through the Python API).
        paired = paired_toy_batches(toy, args.batches, max(args.batch_size, len(T_BUCKETS)))
    levels = args.levels.split(",") if args.levels else None
    shapes = None if (toy is None or args.no_shapes_eval) else toy
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    rows = evaluate_levels(
        model,
        addon,
        batches,
        levels,
        args.repeats,
        shapes,
        {"n_per_category": args.per_category},
        paired=paired,
        guidance=guidance,
        psnr_per_category=args.psnr_per_category,
    )
    if args.out:
        write_json(rows, args.out)
    print(format_table(rows))
    return 0
