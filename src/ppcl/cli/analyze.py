"""``ppcl analyze``: calibration set + teacher → RedundancyReport (+ a proposed PruningPlan)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppcl.cli.common import (
    add_model_args,
    add_overwrite_arg,
    check_out,
    load_model,
    parse_floats,
    require_non_negative,
    require_positive,
    require_seed,
)
from ppcl.logging import get_logger
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR

log = get_logger("cli.analyze")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("analyze", help="probes, CKA trajectories and contiguous intervals → report + plan")
    p.add_argument("--calibration", required=True, help="CalibrationSet folder (from `ppcl calibrate`)")
    p.add_argument("--out", required=True, help="report folder; the proposed plan goes to OUT/plan")
    add_model_args(p)
    p.add_argument("--max-len", type=int, default=10, help="Δ rule length bound, blocks per interval")
    p.add_argument("--protect-first", type=int, default=2, help="first flat blocks no span may touch")
    p.add_argument("--protect-last", type=int, default=2, help="last flat blocks no span may touch")
    p.add_argument(
        "--cka-streams",
        choices=("image", "both"),
        default="image",
        help="CKA trajectory of the image stream, or the mean of image and text",
    )
    p.add_argument("--refine-steps", type=int, default=0, help="Adam refinement steps per probe (0 = closed form)")
    p.add_argument("--ridge", type=float, default=1e-4, help="probe ridge, relative to trace/d")
    p.add_argument("--cache-tokens", type=int, default=8192, help="tokens cached per depth for CKA")
    p.add_argument("--batch-size", type=int, default=32, help="calibration samples per analysis forward")
    p.add_argument("--seed", type=int, default=0, help="seeds the cached-token choice for CKA")
    p.add_argument("--delta-tol", type=float, default=1e-6, help="float-noise tolerance of the Δ boundary rule")
    add_budget_args(p)
    add_width_args(p)
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="0.25,0.4,0.5", help="one level per target (comma-separated)")
    p.add_argument(
        "--target-kind",
        choices=("fraction", "params", "blocks"),
        default="fraction",
        help="fraction of block parameters, parameters or blocks removed",
    )
    p.add_argument("--level-names", default=None, help="comma-separated names, one per target")
    p.add_argument(
        "--init", choices=("first", "middle", "last", "average"), default="first", help="student initialisation"
    )
    p.add_argument(
        "--guard-factor",
        type=float,
        default=DEFAULT_GUARD_FACTOR,
        help="budget guard: an interval scoring more than this many times the largest accepted score is "
        "not forced in to meet a target; the level undershoots, with a note (0 = no guard; "
        f"default {DEFAULT_GUARD_FACTOR:g})",
    )


def budget_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``plan_from_report`` keywords from the budget arguments; a bad guard factor fails here, before any work."""
    from ppcl.plan.guard import check_guard

    check_guard(args.guard_factor)
    return {"guard_factor": args.guard_factor}


def add_width_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--width",
        action="store_true",
        help="also add, for each depth level X, a level 'X+w' with text runs and FFN blocks (stage 2)",
    )
    p.add_argument(
        "--text-cka-threshold",
        type=float,
        default=None,
        help="minimum text-stream CKA of a text run (default: the selector's, 0.95)",
    )
    p.add_argument("--ffn-blocks", type=int, default=2, help="FFN blocks replaced by linear maps per width level")


def finish_plan(plan: Any, report: Any, model: Any, args: argparse.Namespace) -> Any:
    """``plan`` with width levels when ``--width`` is given (validated), else ``plan`` unchanged."""
    if not args.width:
        if args.text_cka_threshold is not None or args.ffn_blocks != 2:
            log.warning("--text-cka-threshold/--ffn-blocks have no effect without --width")
        return plan
    from ppcl.plan import add_width_levels

    out = add_width_levels(plan, report, threshold=args.text_cka_threshold, ffn_blocks=args.ffn_blocks)
    if len(out.levels) == len(plan.levels):
        log.warning("--width: the report shows no text run above the threshold and no FFN block to replace")
    return out


def level_params(plan: Any, model_config: Any) -> str:
    """One line per level: parameters after pruning (meta-device count), for the terminal."""
    rows = ["parameters per level:"]
    base = None
    for name in [None, *plan.level_names]:
        count = plan.param_count(model_config, name)
        base = base or count.total
        rows.append(f"  {name or 'teacher':<12} {count.after / 1e6:10.3f}M  ({count.after / base:6.1%} of the teacher)")
    return "\n".join(rows)


def _run(args: argparse.Namespace) -> int:
    from ppcl.analysis import AnalysisConfig, analyze
    from ppcl.data.calibration import CalibrationSet
    from ppcl.outputs import REPORT
    from ppcl.plan import plan_from_report

    require_positive(args, "max_len", "cache_tokens", "batch_size")
    require_non_negative(args, "protect_first", "protect_last", "refine_steps", "ffn_blocks")
    require_seed(args, "seed")
    check_out(args, REPORT, args.calibration, args.model)
    targets = parse_floats(args.targets, "targets")  # fail on a bad budget before the analysis runs
    budget = budget_kwargs(args)
    calibration = CalibrationSet.load(args.calibration)
    model = load_model(args)
    config = AnalysisConfig(
        max_len=args.max_len,
        protect_first=args.protect_first,
        protect_last=args.protect_last,
        ridge=args.ridge,
        refine_steps=args.refine_steps,
        cka_streams=args.cka_streams,
        cache_tokens=args.cache_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        delta_tol=args.delta_tol,
    )
    report = analyze(model, calibration, config)
    plan = plan_from_report(
        report,
        model.config,
        targets,
        args.target_kind,
        args.level_names.split(",") if args.level_names else None,
        args.init,
        **budget,
    )
    plan = finish_plan(plan, report, model, args)
    # Both artefacts are written only once both exist, so a failed plan leaves no report behind either.
    report.save(args.out, overwrite=args.overwrite)
    plan.save(Path(args.out) / "plan")
    log.info("analyze: report → %s, plan → %s", args.out, Path(args.out) / "plan")
    print(report_summary(report))
    print(plan.summary())
    print(level_params(plan, model.config))
    return 0


def report_summary(report) -> str:
    """A few lines for the terminal: intervals (inclusive) cheapest first."""
    rows = [
        f"{report.model_class}: {report.num_blocks} blocks, {len(report.intervals)} intervals "
        f"(inclusive [u, v], cheapest first)"
    ]
    for i in sorted(report.intervals, key=lambda x: (x.score, x.u)):
        rows.append(f"  [{i.u}, {i.v}]  removes {i.removed}  cka={i.cka:.4f}  score={i.score:.5f}")
    return "\n".join(rows)
