"""``ppcl plan``: a PruningPlan with nested levels from a RedundancyReport and a budget (``--width``: plus width
levels ``X+w`` on top of each depth level ``X``)."""

from __future__ import annotations

import argparse

from ppcl.cli.analyze import add_budget_args, add_width_args, budget_kwargs, finish_plan, level_params
from ppcl.cli.common import add_model_args, add_overwrite_arg, check_out, load_model, parse_floats, require_non_negative


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("plan", help="budget → nested levels from a report's intervals (or validate a plan)")
    p.add_argument("--report", default=None, help="RedundancyReport folder (from `ppcl analyze`)")
    p.add_argument("--out", default=None, help="plan folder to write")
    p.add_argument("--validate", default=None, help="only validate this plan folder/file and print it")
    add_model_args(p)
    add_budget_args(p)
    add_width_args(p)
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.errors import ConfigError
    from ppcl.plan import PruningPlan

    if args.validate is not None:
        print(PruningPlan.load(args.validate).summary())
        return 0
    if args.report is None or args.out is None:
        raise ConfigError(
            "ppcl plan needs a report and an output",
            expected="--report DIR --out DIR",
            found=f"--report {args.report} --out {args.out}",
            fix="or use --validate PLAN",
        )
    from ppcl.analysis import RedundancyReport
    from ppcl.outputs import PLAN
    from ppcl.plan import plan_from_report

    require_non_negative(args, "ffn_blocks")
    check_out(args, PLAN, args.report, args.model)

    targets, budget = parse_floats(args.targets, "targets"), budget_kwargs(args)  # bad budgets fail before loading
    report = RedundancyReport.load(args.report)
    model = load_model(args)
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
    plan.save(args.out, overwrite=args.overwrite)
    print(plan.summary())
    print(level_params(plan, model.config))
    return 0
