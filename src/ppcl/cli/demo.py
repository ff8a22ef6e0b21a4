"""``ppcl demo``: the whole method on the embedded toy world (see :mod:`ppcl.demo`), ending in ``report.html``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ppcl.cli.common import require_positive


def register(verbs: argparse._SubParsersAction) -> None:
    demo = verbs.add_parser(
        "demo",
        help="run ppcl end to end on the embedded toy world (about 10-12 min on 2 cores)",
        description="calibrate → analyze → plan (3 levels) → depth → width → fine-tune → eval, "
        "on the committed toy teacher; writes OUT/report.html",
    )
    demo.add_argument("--out", default="ppcl-demo", help="output folder (default: ppcl-demo)")
    demo.add_argument("--fast", action="store_true", help="smoke run of every stage in about a minute")
    demo.add_argument("--depth-steps", type=int, default=None, help="override the depth distillation steps")
    demo.add_argument("--width-steps", type=int, default=None, help="override the width distillation steps")
    demo.add_argument("--finetune-steps", type=int, default=None, help="override the fine-tune steps")
    demo.add_argument("--per-category", type=int, default=None, help="ShapesEval prompts per category (x2 seeds)")
    demo.add_argument(
        "--teacher",
        default=None,
        metavar="NAME|FOLDER",
        help="a committed toy teacher (toy16, the default; toy24: 24 blocks of width 96) or a folder "
        "saved by `ppcl toy train-teacher`",
    )
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ppcl.demo import DemoConfig, run_demo
    from ppcl.outputs import refuse_overlap
    from ppcl.toy.teacher import teacher_folder

    overrides = {
        k: v
        for k, v in (
            ("depth_steps", args.depth_steps),
            ("width_steps", args.width_steps),
            ("finetune_steps", args.finetune_steps),
            ("per_category", args.per_category),
        )
        if v is not None
    }
    require_positive(args, "depth_steps", "width_steps", "finetune_steps", "per_category", "threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig.fast(**overrides) if args.fast else DemoConfig.full(**overrides)
    out = Path(args.out)
    teacher = teacher_folder(args.teacher)
    # A re-run replaces the demo's own sub-folders of --out: a teacher inside it (or around it) could be deleted.
    refuse_overlap(out, [teacher])
    command = "ppcl " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "ppcl demo"
    run_demo(out, config, command=command, teacher_folder=teacher)
    print(out / "report.html")
    return 0
