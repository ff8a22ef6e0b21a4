"""``ppcl toy eval`` and ``ppcl toy sample``."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ppcl.cli.common import add_overwrite_arg, check_out, require_positive, require_seed
from ppcl.io import write_json
from ppcl.logging import get_logger

log = get_logger("cli.toy")


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="ShapesEval of the toy teacher (or of rendered ground truth)")
    ev.add_argument("--out", required=True, help="JSON file for the scores")
    ev.add_argument("--ground-truth", action="store_true", help="score rendered ground-truth scenes instead")
    ev.add_argument("--teacher", default=None, help="teacher folder (default: the committed teacher)")
    ev.add_argument("--per-category", type=int, default=60, help="benchmark prompts per category (4 categories)")
    ev.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 2; 3 for --ground-truth)")
    _sampler_args(ev)
    add_overwrite_arg(ev)
    ev.set_defaults(func=_eval)

    sa = sub.add_parser("sample", help="sample an image grid from the toy teacher")
    sa.add_argument("--prompt", action="append", required=True, help="caption (repeat for several rows)")
    sa.add_argument("--out", required=True, help="PNG file")
    sa.add_argument("--n", type=int, default=8, help="images per prompt (one row each)")
    sa.add_argument("--seed", type=int, default=0, help="noise seed")
    sa.add_argument("--teacher", default=None, help="teacher folder (default: the committed teacher)")
    _sampler_args(sa)
    add_overwrite_arg(sa)
    sa.set_defaults(func=_sample)


def _sampler_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")


def _sampler(args: argparse.Namespace):
    from ppcl.toy.sampler import SamplerConfig

    require_positive(args, "steps")
    return SamplerConfig(steps=args.steps, guidance=args.guidance)


def _eval(args: argparse.Namespace) -> int:
    from ppcl.outputs import JSON_RESULTS
    from ppcl.toy.benchmark import score_ground_truth, score_model
    from ppcl.toy.teacher import ToyTeacher

    check_out(args, JSON_RESULTS, args.teacher)
    if args.seeds is None:
        args.seeds = 3 if args.ground_truth else 2
    require_positive(args, "per_category", "seeds")
    seeds = tuple(range(args.seeds))
    if args.ground_truth:
        result = score_ground_truth(args.per_category, seeds)
    else:
        t0 = time.time()
        result = score_model(ToyTeacher.load(args.teacher), None, args.per_category, seeds, _sampler(args))
        log.info("scored %d images in %.0f s", result["n_images"], time.time() - t0)
    # Robust scores at the top level, the strict scorer's under "strict" (same images).
    write_json(result, args.out)
    log.info("ShapesEval overall: robust %.3f, strict %.3f", result["overall"], result["strict"]["overall"])
    print(json.dumps(result))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from ppcl.outputs import IMAGE
    from ppcl.toy.images import make_grid, save_png
    from ppcl.toy.sampler import sample
    from ppcl.toy.teacher import ToyTeacher

    require_positive(args, "n")
    require_seed(args, "seed")
    check_out(args, IMAGE, args.teacher)
    teacher = ToyTeacher.load(args.teacher)
    for prompt in args.prompt:
        teacher.tokenizer.encode_one(prompt)  # fail on a bad caption before any sampling
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = sample(teacher, prompts, seeds, _sampler(args))
    path = save_png(make_grid(images, ncols=args.n, scale=4), args.out)
    print(path)
    return 0


def score_teacher_into_card(teacher, folder: str | os.PathLike[str]) -> dict:
    """Score a freshly trained teacher (reloaded from its fp16 files, as users get it) and add it to its card.

    The card keeps the strict scores under ``"shapes_eval"`` (the entry cards always had) and the robust ones under
    ``"shapes_eval_robust"``; both come from one sampling.
    """
    from ppcl.toy.benchmark import score_model
    from ppcl.toy.teacher import CARD_FILE, ToyTeacher, load_card

    t0 = time.time()
    result = score_model(ToyTeacher.load(folder))
    card = load_card(folder)
    card["shapes_eval"] = result["strict"]
    card["shapes_eval_robust"] = {k: v for k, v in result.items() if k != "strict"}
    card["shapes_eval_protocol"] = {
        "per_category": 60,
        "seeds": 2,
        "sampler_steps": 20,
        "guidance": 4.0,
        "weights": "fp16 files upcast to fp32",
        "eval_time_s": round(time.time() - t0, 1),
        "scorers": {"shapes_eval": "strict", "shapes_eval_robust": "robust (same images)"},
    }
    write_json(card, Path(folder) / CARD_FILE)
    log.info("teacher ShapesEval: %s", result)
    return result
