"""``ppcl distill``: plan + data → trained PruningAddon (non-sequential depth distillation by default).

Stages (``--stage``, METHOD.md): ``depth`` (1.3, from ``--plan``, or continuing ``--addon``), ``width`` (2: least-squares
init then training of one level's projections) and ``finetune`` (3: one level end to end; ``--full`` also trains the
surviving base blocks → standalone). Width and fine-tune continue an existing add-on (``--addon``, usually the
depth-trained ``OUT/addon``) whose plan holds the level; every stage writes a new run folder with its own ``OUT/addon``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppcl.cli.common import add_model_args, add_overwrite_arg, load_model, require_seed
from ppcl.cli.distill_checks import check_args
from ppcl.distill.config import DEFAULT_WARMUP_SHARE, DistillConfig
from ppcl.distill.objective import LEVEL_MODES, FinetuneObjective
from ppcl.logging import get_logger

log = get_logger("cli.distill")
STAGES = ("depth", "width", "finetune")
# One source of defaults: the CLI shows DistillConfig's own, so the API and the CLI cannot drift apart.
_DEFAULTS = DistillConfig()
_OBJECTIVE = FinetuneObjective()
_WARMUP_SHARE = DEFAULT_WARMUP_SHARE
# The objective's flags and their defaults: set on another stage, they would do nothing.


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("distill", help="train the students of a plan → add-on (OUT/addon)")
    p.add_argument(
        "--stage",
        choices=STAGES,
        default="depth",
        help="depth (default) | width (needs --addon, --level) | finetune (needs --addon, --level)",
    )
    p.add_argument("--plan", default=None, help="PruningPlan folder or plan.json (depth stage, fresh add-on)")
    p.add_argument("--addon", default=None, help="continue this add-on folder (its plan is used)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoint/, addon/")
    add_model_args(p)
    p.add_argument(
        "--pipeline",
        default=None,
        help="diffusers pipeline folder (or a Hub id in the local cache): distil its transformer on --calibration (captured with "
        "`ppcl calibrate --pipeline`) or --data (a latent cache from `ppcl cache --pipeline`)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="train on a latent cache written by `ppcl cache` (noised at scheduler-shaped times; "
        "instead of --calibration)",
    )
    p.add_argument(
        "--caption-dropout",
        type=float,
        default=None,
        help="probability of training a sample on the empty prompt's embedding, the unconditional branch CFG runs "
        "every step (default: 0.1, with --data and on the toy; the demo uses 0.3)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="train on a CalibrationSet, and for --stage width fit the least-squares init on all of it "
        "(default for the toy: fresh ShapesWorld batches)",
    )
    p.add_argument(
        "--mode",
        choices=("nonsequential", "sequential"),
        default=_DEFAULTS.mode,
        help="depth: nonsequential (the method) or sequential (ablation baseline)",
    )
    p.add_argument(
        "--chain-mix",
        type=float,
        default=_DEFAULTS.chain_mix,
        help="depth, nonsequential: share of each batch a student trains on its chained input (the "
        "upstream students' output in its levels); 0 = the paper's pure non-sequential",
    )
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimiser steps")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="AdamW learning rate (peak)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="samples per micro-batch and process")
    p.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up steps (default: {round(_WARMUP_SHARE * 100)}%% of --steps)"
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="accelerate's autocast; a bf16/fp16 --dtype base autocasts to its own dtype without it (the "
        "trained weights are float32 masters either way; OUT/addon is saved in the base dtype)",
    )
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    p.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument(
        "--shard",
        action="store_true",
        help="depth (non-sequential): FSDP2-shard the frozen teacher and the students over the processes "
        "(on by itself under an accelerate FSDP config; docs/scale.md)",
    )
    p.add_argument(
        "--teacher-reuse",
        type=int,
        default=_DEFAULTS.teacher_reuse,
        help="data echoing: each batch and its frozen teacher pass serve this many consecutive steps "
        "(README 'Recipes beyond the paper')",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=_DEFAULTS.checkpoint_every,
        help="steps between resumable checkpoints (0: only the final add-on)",
    )
    p.add_argument(
        "--init", choices=("first", "middle", "last", "average"), default=None, help="override the plan's init"
    )
    p.add_argument(
        "--level",
        default=None,
        help="depth: train only this level's spans; width/finetune (required): the level to train",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="finetune: also train the surviving base blocks (result is standalone: OUT/merged)",
    )
    _objective_args(p)
    p.add_argument(
        "--timestep-sampling",
        choices=("uniform", "logit_normal"),
        default="uniform",
        help="how --data / toy batches draw their noise times",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds batch order, noise and students")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint")
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _objective_args(p: argparse.ArgumentParser) -> None:
    """The fine-tune objective's flags (``--stage finetune``)."""
    p.add_argument(
        "--guidance",
        type=float,
        default=_OBJECTIVE.guidance,
        help="finetune: train on paired cond/uncond inputs at this guidance scale (the guided velocity "
        "and the guidance direction); default: the plain output loss",
    )
    p.add_argument("--output-weight", type=float, default=_OBJECTIVE.output_weight, help="finetune: output MSE weight")
    p.add_argument(
        "--guided-weight",
        type=float,
        default=_OBJECTIVE.guided_weight,
        help="finetune with --guidance: weight of the guided-velocity MSE",
    )
    p.add_argument(
        "--direction-weight",
        type=float,
        default=_OBJECTIVE.direction_weight,
        help="finetune with --guidance: weight of the guidance-direction (v_c - v_u) MSE",
    )
    p.add_argument(
        "--levels",
        default="",
        help="finetune: more levels trained together with --level (comma list; 'all' = every level)",
    )
    p.add_argument(
        "--level-mode",
        choices=LEVEL_MODES,
        default=_OBJECTIVE.level_mode,
        help="finetune with --levels: all = every level on every batch, draw = one level per batch",
    )
    p.add_argument(
        "--on-policy",
        type=float,
        default=_OBJECTIVE.on_policy,
        help="finetune with --guidance: share of each batch noised by the pruned model's own sampler",
    )
    p.add_argument(
        "--on-policy-steps",
        type=int,
        default=_OBJECTIVE.on_policy_steps,
        help="finetune with --on-policy: sampler steps of the pruned model's own trajectories",
    )


def _objective(args: argparse.Namespace, addon: Any) -> FinetuneObjective:
    names = addon.plan.level_names if args.levels == "all" else [n for n in args.levels.split(",") if n]
    objective = FinetuneObjective(
        args.guidance,
        args.output_weight,
        args.guided_weight,
        args.direction_weight,
        tuple(n for n in names if n != args.level),
        args.level_mode,
        args.on_policy,
        args.on_policy_steps,
        args.seed,
    )
    return objective.validate()


def _run(args: argparse.Namespace) -> int:
    from ppcl.distill import distill_depth, distill_width, finetune
    from ppcl.outputs import refuse_overlap

    check_args(args)
    require_seed(args, "seed")
    # The run folder's own rules (resume / overwrite / not a run) are checked by the trainer (ppcl.distill.run_folder).
    refuse_overlap(args.out, (args.model, args.plan, args.addon, args.pipeline, args.calibration, args.data))
    _pipeline_args(args)
    model = load_model(args)
    addon = _addon(args, model)
    warmup = args.warmup if args.warmup is not None else max(1, round(args.steps * _WARMUP_SHARE))
    config = DistillConfig(
        mode=args.mode,
        chain_mix=args.chain_mix,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup=warmup,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_accumulation=args.gradient_accumulation,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        shard=args.shard,
        teacher_reuse=args.teacher_reuse,
    )
    data = _data(args, model)
    if args.stage == "depth":
        distill_depth(
            model, addon, data, config, args.out, resume=args.resume, level=args.level, overwrite=args.overwrite
        )
    elif args.stage == "width":
        calibration = getattr(data, "calibration", None)
        distill_width(
            model,
            addon,
            data,
            config,
            args.out,
            args.level,
            calibration=calibration,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    else:
        finetune(
            model,
            addon,
            data,
            config,
            args.out,
            args.level,
            full=args.full,
            resume=args.resume,
            objective=_objective(args, addon),
            overwrite=args.overwrite,
        )
    print(Path(args.out) / "addon")
    return 0


def _pipeline_args(args: argparse.Namespace) -> None:
    """``--pipeline PATH`` = the pipeline's transformer as the model, trained on a CalibrationSet captured from it.

    Training reads only the cached transformer inputs, so the text encoder and VAE are never loaded here.
    """
    from ppcl.errors import ConfigError

    if args.pipeline is None:
        return
    if args.model is not None:
        raise ConfigError(
            "--pipeline and --model both name the model",
            expected="one of them",
            found=f"--pipeline {args.pipeline} --model {args.model}",
            fix="drop --model",
        )
    if args.calibration is None and args.data is None:
        raise ConfigError(
            "--pipeline trains on cached transformer inputs",
            expected="--calibration DIR or --data DIR",
            found="none",
            fix=f"run `ppcl calibrate --pipeline {args.pipeline} --out CAL` or "
            f"`ppcl cache --pipeline {args.pipeline} ... --out CACHE` first",
        )
    args.model = args.pipeline  # load_transformer reads PATH/transformer of a pipeline folder


def _addon(args: argparse.Namespace, model: Any) -> Any:
    """A fresh add-on from ``--plan``, or the one in ``--addon`` (its level checked against its plan)."""
    from ppcl.addon import PruningAddon

    if args.addon is None:
        from ppcl.plan import PruningPlan

        return PruningAddon.from_plan(model, PruningPlan.load(args.plan), init=args.init)
    addon = PruningAddon.from_pretrained(args.addon, model)
    if args.level is not None:
        addon.plan.level(args.level)  # an unknown level fails here, naming the add-on's levels
    return addon


def _data(args: argparse.Namespace, model: Any) -> Any:
    """Training batches: a latent cache (``--data``), the CalibrationSet (``--calibration``) or, for the toy, fresh
    ShapesWorld batches."""
    from ppcl.distill import CalibrationData
    from ppcl.toy.distill_data import ToyDistillData

    if args.data is not None:
        from ppcl.data.loading import parse_dtype
        from ppcl.distill.latent_data import LatentCacheData, read_scheduler_config

        scheduler = read_scheduler_config(args.pipeline) if args.pipeline is not None else None
        data = LatentCacheData(
            args.data,
            args.batch_size,
            args.seed,
            args.timestep_sampling,
            0.1 if args.caption_dropout is None else args.caption_dropout,
            scheduler_config=scheduler,
            dtype=parse_dtype(args.dtype),
        )
        data.check_model(model)
        return data

    if args.calibration is not None:
        from ppcl.data.calibration import CalibrationSet

        calibration = CalibrationSet.load(args.calibration)
        calibration.check_model(model)
        return CalibrationData(calibration, args.batch_size, args.seed)
    if args.model is not None:
        from ppcl.errors import ConfigError

        raise ConfigError(
            "no training data for a real model",
            expected="--calibration DIR or --data CACHE",
            found="none",
            fix="capture inputs with `ppcl calibrate --pipeline ...` first",
        )
    from ppcl.toy.teacher import ToyTeacher

    dropout = 0.1 if args.caption_dropout is None else args.caption_dropout
    return ToyDistillData(ToyTeacher.load(), args.batch_size, args.seed, args.timestep_sampling, dropout)
