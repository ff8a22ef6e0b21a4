"""Fine-tune objectives on one depth-trained add-on, several seeds (issue 13): plain output MSE on one level (the old
default), plain on every level, guided (paired cond/uncond, guided velocity) on every level, + the direction term.

Starts from the add-ons that ``benchmarks/depth_recipes.py`` trained (``--depth-run OUT/<variant>``: one
``seed<s>/run/addon`` per seed) and measures every level before and after each fine-tune with the same metrics
(velocity cosine, guided NMSE, direction NMSE, ShapesEval), so a level made worse by the fine-tune shows. Mean ±
standard error over the seeds, appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _results import append
from depth_recipes import agreement, mean_se, paired_batches, score, shapes_images, velocities
from ppcl.addon import PruningAddon
from ppcl.distill import DistillConfig, FinetuneObjective, finetune
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.sampler import SamplerConfig
from ppcl.toy.teacher import ToyTeacher

G = SamplerConfig().guidance
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "plain-top": {"objective": FinetuneObjective()},
    "plain-all": {"objective": FinetuneObjective(), "all": True},
    "plain-draw": {"objective": FinetuneObjective(level_mode="draw"), "all": True},  # the demo's
    "guided-all": {"objective": FinetuneObjective(guidance=G), "all": True},
    "guided+dir-all": {"objective": FinetuneObjective(guidance=G, direction_weight=1.0), "all": True},
}


def evaluate(
    teacher: ToyTeacher, addon: PruningAddon, pairs: list, reference: tuple, per_category: int, folder: Path
) -> dict[str, Any]:
    model = teacher.transformer
    rows: dict[str, Any] = {}
    apply_addon(model, addon)
    try:
        for level in addon.plan.level_names:
            set_level(model, level)
            row = agreement(velocities(model, pairs), reference, G)
            prompts, images = shapes_images(teacher, model, per_category)
            np.save(folder / f"{level}_images.npy", images)
            row.update(score(prompts, images))
            rows[level] = row
    finally:
        remove_addon(model)
    return rows


def run(
    teacher: ToyTeacher, name: str, seed: int, args: argparse.Namespace, pairs: list, reference: tuple
) -> dict[str, Any]:
    model = teacher.transformer
    addon = PruningAddon.from_pretrained(Path(args.depth_run) / f"seed{seed}" / "run" / "addon", model)
    folder = Path(args.out) / f"{name}{args.tag}" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = VARIANTS[name]
    t0 = time.perf_counter()
    if "objective" in spec:
        levels = addon.plan.level_names
        top = levels[-1]
        objective = spec["objective"]
        if spec.get("all"):
            objective = FinetuneObjective(**{**objective.to_json(), "levels": tuple(levels[:-1]), "seed": seed})
        cfg = DistillConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=max(1, args.steps // 20),
            checkpoint_every=0,
            log_every=10,
            seed=seed,
            teacher_reuse=args.teacher_reuse,
        )
        data = ToyDistillData(teacher, args.batch_size, seed=seed, caption_dropout=args.caption_dropout)
        finetune(model, addon, data, cfg, folder / "run", level=top, objective=objective)
    train_s = round(time.perf_counter() - t0, 1)
    rows = evaluate(teacher, addon, pairs, reference, args.per_category, folder)
    rows["train_s"] = train_s
    (folder / "result.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth-run", required=True, help="a depth_recipes variant folder (holds seed<s>/run/addon)")
    parser.add_argument("--variants", default="none,plain-top,plain-all,guided-all")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--teacher-reuse", type=int, default=1, help="data echoing: steps per teacher pass")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty-prompt training samples")
    parser.add_argument("--tag", default="", help="suffix of the variants' folders and table rows")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/finetune_recipes")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = ToyTeacher.load()
    pairs = paired_batches(teacher, 4, 32)
    reference = velocities(teacher.transformer, pairs)
    rows, images = shapes_images(teacher, teacher.transformer, args.per_category)
    teacher_scores = score(rows, images)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.setdefault(name + args.tag, []).append(run(teacher, name, seed, args, pairs, reference))
            print(name + args.tag, seed, json.dumps(results[name + args.tag][-1]), flush=True)
    levels = [k for k in results[next(iter(results))][0] if k != "train_s"]
    keys = ["cosine", "guided_nmse", "direction_nmse", *teacher_scores]
    lines = [
        "| fine-tune | level | " + " | ".join(keys) + " | s |",
        "|---" * (len(keys) + 3) + "|",
        "| teacher | | 1 | 0 | 0 | " + " | ".join(f"{teacher_scores[k]:.3f}" for k in teacher_scores) + " | |",
    ]
    for name, runs in results.items():
        for level in levels:
            lines.append(
                f"| {name} | {level} | "
                + " | ".join(mean_se([r[level][k] for r in runs]) for k in keys)
                + f" | {np.mean([r['train_s'] for r in runs]):.0f} |"
            )
    body = (
        f"From the depth add-ons of `{args.depth_run}`; {args.steps} fine-tune steps at batch {args.batch_size}, "
        f"lr {args.lr}, teacher reuse {args.teacher_reuse}, caption dropout {args.caption_dropout}, guidance {G} for the guided variants; ShapesEval {args.per_category} prompts per category "
        "x 2 seeds; mean ± standard error over seeds " + args.seeds + ".\n\n" + "\n".join(lines)
    )
    print(body)
    if not args.no_append:
        append("Fine-tune objectives: plain vs multi-level vs guided (toy teacher)", body)


if __name__ == "__main__":
    main()
