"""``ppcl distill``: the flag combinations refused before anything loads."""

from __future__ import annotations

import argparse

from ppcl.distill.config import DistillConfig
from ppcl.distill.objective import FinetuneObjective

_DEFAULTS = DistillConfig()
_OBJECTIVE = FinetuneObjective()
#: Fine-tune objective flags and their defaults: set to anything else, they need --stage finetune.
_OBJECTIVE_FLAGS = {
    "guidance": _OBJECTIVE.guidance,
    "output_weight": _OBJECTIVE.output_weight,
    "guided_weight": _OBJECTIVE.guided_weight,
    "direction_weight": _OBJECTIVE.direction_weight,
    "levels": "",
    "level_mode": _OBJECTIVE.level_mode,
    "on_policy": _OBJECTIVE.on_policy,
    "on_policy_steps": _OBJECTIVE.on_policy_steps,
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse wrong flag combinations before anything loads."""
    from ppcl.errors import ConfigError

    if args.stage == "depth" and (args.plan is None) == (args.addon is None):
        raise ConfigError(
            "depth distillation needs exactly one starting point",
            expected="--plan DIR or --addon DIR",
            found=f"--plan {args.plan} --addon {args.addon}",
            fix="--plan for a fresh add-on, --addon to continue one",
        )
    if args.stage != "depth":
        if args.addon is None or args.level is None:
            raise ConfigError(
                f"--stage {args.stage} continues a trained add-on at one level",
                expected="--addon DIR --level NAME",
                found=f"--addon {args.addon} --level {args.level}",
                fix="pass the depth run's OUT/addon and a level of its plan (e.g. 'p25+w')",
            )
        if args.plan is not None:
            raise ConfigError(
                f"--stage {args.stage} takes its plan from the add-on",
                expected="no --plan",
                found=f"--plan {args.plan}",
                fix="drop --plan",
            )
        if args.chain_mix != _DEFAULTS.chain_mix:
            raise ConfigError(
                "--chain-mix applies to the depth stage only",
                expected="no --chain-mix",
                found=f"--chain-mix {args.chain_mix} with --stage {args.stage}",
                fix="drop --chain-mix",
            )
        if args.mode != "nonsequential":
            raise ConfigError(
                "--mode applies to the depth stage only",
                expected="--mode nonsequential",
                found=f"--mode {args.mode} with --stage {args.stage}",
                fix="drop --mode",
            )
    if args.data is not None and args.calibration is not None:
        raise ConfigError(
            "two training data sources",
            expected="--data CACHE or --calibration CAL",
            found=f"--data {args.data} --calibration {args.calibration}",
            fix="drop one of them",
        )
    if args.data is not None and args.pipeline is None and args.model is None:
        raise ConfigError(
            "--data is a latent cache of a real pipeline",
            expected="--pipeline P --data CACHE",
            found="no --pipeline",
            fix="pass the pipeline the cache was built with",
        )
    objective_flags = [
        f"--{k.replace('_', '-')}" for k, default in _OBJECTIVE_FLAGS.items() if getattr(args, k) != default
    ]
    if args.stage != "finetune" and objective_flags:
        raise ConfigError(
            f"{', '.join(objective_flags)} shape the fine-tune objective",
            expected="--stage finetune",
            found=f"--stage {args.stage}",
            fix="drop them, or use --stage finetune",
        )
    if args.full and args.stage != "finetune":
        raise ConfigError(
            "--full is a fine-tune option",
            expected="--stage finetune --full",
            found=f"--stage {args.stage} --full",
            fix="drop --full or use --stage finetune",
        )
    if args.init is not None and args.addon is not None:
        raise ConfigError(
            "--init shapes fresh students only",
            expected="--init with --plan",
            found=f"--init {args.init} with --addon",
            fix="drop --init",
        )
