"""``ppcl analyze``: calibration set + teacher → RedundancyReport (+ a proposed PruningPlan)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppcl.cli.common import add_model_args, load_model, parse_floats
from ppcl.logging import get_logger

log = get_logger("cli.analyze")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("analyze", help="probes, CKA trajectories and contiguous intervals → report + plan")
    p.add_argument("--calibration", required=True, help="CalibrationSet folder (from `ppcl calibrate`)")
    p.add_argument("--out", required=True, help="report folder; the proposed plan goes to OUT/plan")
    add_model_args(p)
    p.add_argument("--max-len", type=int, default=10, help="Δ rule length bound, blocks per interval")
    p.add_argument("--protect-first", type=int, default=2)
    p.add_argument("--protect-last", type=int, default=2)
    p.add_argument("--cka-streams", choices=("image", "both"), default="image")
    p.add_argument("--refine-steps", type=int, default=0, help="Adam refinement steps per probe (0 = closed form)")
    p.add_argument("--ridge", type=float, default=1e-4, help="probe ridge, relative to trace/d")
    p.add_argument("--cache-tokens", type=int, default=8192, help="tokens cached per depth for CKA")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-tol", type=float, default=1e-6, help="float-noise tolerance of the Δ boundary rule")
    add_budget_args(p)
    p.set_defaults(func=_run)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="0.25,0.4,0.5", help="one level per target (comma-separated)")
    p.add_argument("--target-kind", choices=("fraction", "params", "blocks"), default="fraction",
                   help="fraction of block parameters, parameters or blocks removed")
    p.add_argument("--level-names", default=None, help="comma-separated names, one per target")
    p.add_argument("--init", choices=("first", "middle", "last"), default="first", help="student initialisation")


def _run(args: argparse.Namespace) -> int:
    from ppcl.analysis import AnalysisConfig, analyze, plan_from_report
    from ppcl.data.calibration import CalibrationSet

    calibration = CalibrationSet.load(args.calibration)
    model = load_model(args)
    config = AnalysisConfig(max_len=args.max_len, protect_first=args.protect_first, protect_last=args.protect_last,
                            ridge=args.ridge, refine_steps=args.refine_steps, cka_streams=args.cka_streams,
                            cache_tokens=args.cache_tokens, batch_size=args.batch_size, seed=args.seed,
                            delta_tol=args.delta_tol)
    report = analyze(model, calibration, config)
    report.save(args.out)
    plan = plan_from_report(report, model.config, parse_floats(args.targets, "targets"), args.target_kind,
                            args.level_names.split(",") if args.level_names else None, args.init)
    plan.save(Path(args.out) / "plan")
    log.info("analyze: report → %s, plan → %s", args.out, Path(args.out) / "plan")
    print(report_summary(report))
    print(plan.summary())
    return 0


def report_summary(report) -> str:
    """A few lines for the terminal: intervals (inclusive) cheapest first."""
    rows = [f"{report.model_class}: {report.num_blocks} blocks, {len(report.intervals)} intervals "
            f"(inclusive [u, v], cheapest first)"]
    for i in sorted(report.intervals, key=lambda x: (x.score, x.u)):
        rows.append(f"  [{i.u}, {i.v}]  removes {i.removed}  cka={i.cka:.4f}  score={i.score:.5f}")
    return "\n".join(rows)
