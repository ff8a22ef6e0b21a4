"""``ppcl toy``: the toy world's own tools (train the teacher, sample, evaluate)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ppcl.cli.common import require_positive, require_seed


def register(verbs: argparse._SubParsersAction) -> None:
    toy = verbs.add_parser("toy", help="the embedded toy world: train-teacher, sample, eval")
    sub = toy.add_subparsers(dest="toy_verb", required=True, metavar="TOY_VERB")

    train = sub.add_parser("train-teacher", help="train the toy teacher from scratch (deterministic)")
    train.add_argument("--out", required=True, help="output folder (resumes if it holds a trainer state)")
    train.add_argument("--steps", type=int, default=6000, help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=64, help="images per batch")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (peak)")
    train.add_argument("--seed", type=int, default=0, help="seeds data and weights")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    train.add_argument(
        "--layers", type=int, default=None, help="dual-stream blocks (default: the committed teacher's 16)"
    )
    train.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads of width 32 (default: the committed teacher's 4, width 128)",
    )
    train.add_argument("--eval", action="store_true", help="score the result with ShapesEval and add it to the card")
    train.set_defaults(func=_train)

    try:
        from ppcl.cli import toy_eval
    except ImportError:  # pragma: no cover - present once ShapesEval lands
        return
    toy_eval.register(sub)


def _model_config(args: argparse.Namespace) -> dict | None:
    """The transformer config with ``--layers`` / ``--heads`` applied, or None for the committed teacher's."""
    if args.layers is None and args.heads is None:
        return None
    from ppcl.errors import ConfigError
    from ppcl.toy.teacher import TEACHER_CONFIG

    for flag, value in (("--layers", args.layers), ("--heads", args.heads)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected a positive integer, found {value}; pass 1 or more")
    config = dict(TEACHER_CONFIG)
    if args.layers is not None:
        config["num_layers"] = args.layers
    if args.heads is not None:
        config["num_attention_heads"] = args.heads
    return config


def _train(args: argparse.Namespace) -> int:
    import torch

    from ppcl.toy.train_teacher import TeacherTrainConfig, train_teacher

    require_positive(args, "steps", "batch_size", "threads", "layers", "heads")
    require_seed(args, "seed")
    if args.threads is not None:
        # Float reductions depend on the thread count: fixing it makes the run reproducible bit for bit.
        torch.set_num_threads(args.threads)

    cfg = TeacherTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    command = "ppcl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    teacher = train_teacher(cfg, args.out, command=command, model_config=_model_config(args))
    if args.eval:
        from ppcl.cli.toy_eval import score_teacher_into_card

        score_teacher_into_card(teacher, args.out)
    return 0
