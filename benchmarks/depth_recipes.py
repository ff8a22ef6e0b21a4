"""Depth-distillation recipes on one plan, several seeds (issue 13): pure non-sequential vs chain-aware vs sequential,
and the student initialisations.

Every variant trains the same depth plan (by default the committed toy teacher's analysis, levels at ``--targets``)
for the same steps and data, with training seed ``s`` (data order and RNG) for each ``s`` in ``--seeds``. Per variant
and level it measures, on held-out data:

* velocity cosine on conditional batches (what ppcl reported so far);
* guided-velocity NMSE at the sampler's guidance and NMSE of the guidance direction v_c − v_u on paired cond/uncond
  batches (METHOD.md "Metrics");
* ShapesEval on ``--per-category`` prompts x 2 seeds, sampled once; the images are kept (``OUT/<variant>/<seed>/``)
  so they can be re-scored without re-sampling (``--rescore``).

Results are mean ± standard error over the seeds, appended to benchmarks/RESULTS.md.
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
from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, analyze
from ppcl.distill import DistillConfig, distill_depth
from ppcl.plan import PruningPlan, plan_from_report
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.sampler import SamplerConfig, sample
from ppcl.toy.shapes_eval import benchmark_prompts, evaluate
from ppcl.toy.teacher import ToyTeacher

VARIANTS: dict[str, dict[str, Any]] = {
    "pure": {"mode": "nonsequential", "chain_mix": 0.0},
    "chain0.5": {"mode": "nonsequential", "chain_mix": 0.5},
    "chain1": {"mode": "nonsequential", "chain_mix": 1.0},
    "sequential": {"mode": "sequential"},
    "chain0.5-average": {"mode": "nonsequential", "chain_mix": 0.5, "init": "average"},
    "chain0.5-middle": {"mode": "nonsequential", "chain_mix": 0.5, "init": "middle"},
}
EVAL_SEED = 12345  # held-out data seed: never a training seed


def build_plan(teacher: ToyTeacher, targets: tuple[float, ...], out: Path) -> PruningPlan:
    """The analysis plan of the committed teacher at ``targets`` (cached in ``out/plan``)."""
    if (out / "plan" / "plan.json").exists():
        return PruningPlan.load(out / "plan")
    calibration = calibrate_toy(teacher, 32, n_timesteps=6)
    report = analyze(teacher.transformer, calibration, AnalysisConfig(seed=0))
    names = tuple(f"p{round(t * 100)}" for t in targets)
    plan = plan_from_report(report, teacher.transformer.config, targets, level_names=names)
    plan.save(out / "plan")
    return plan


def paired_batches(teacher: ToyTeacher, n: int, batch: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Held-out conditional batches (no caption dropout) and their unconditional twins (same x_t, t; empty prompt)."""
    pairs = []
    for i in range(n):
        cond = ToyDistillData(teacher, batch, seed=EVAL_SEED, caption_dropout=0.0).batch(i)
        emb, mask = teacher.encode_prompts([""] * batch)
        pairs.append((cond, {**cond, "encoder_hidden_states": emb, "encoder_hidden_states_mask": mask}))
    return pairs


@torch.no_grad()
def velocities(model: torch.nn.Module, pairs: list[tuple[dict, dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    cond = torch.cat([model(**c, return_dict=False)[0] for c, _ in pairs])
    uncond = torch.cat([model(**u, return_dict=False)[0] for _, u in pairs])
    return cond, uncond


def nmse(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred - ref).pow(2).sum() / ref.pow(2).sum())


def agreement(
    pruned: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor], g: float
) -> dict[str, float]:
    (pc, pu), (tc, tu) = pruned, teacher
    cos = torch.nn.functional.cosine_similarity(pc.flatten(1), tc.flatten(1)).mean()
    return {
        "cosine": float(cos),
        "guided_nmse": nmse(pu + g * (pc - pu), tu + g * (tc - tu)),
        "direction_nmse": nmse(pc - pu, tc - tu),
    }


def shapes_images(teacher: ToyTeacher, model: torch.nn.Module, per_category: int) -> tuple[list, np.ndarray]:
    prompts = benchmark_prompts(per_category)
    rows = [p for _ in (0, 1) for p in prompts]
    seeds = [s * 100_000 + i for s in (0, 1) for i in range(len(prompts))]
    return rows, sample(teacher, [p.text for p in rows], seeds, SamplerConfig(), transformer=model)


def score(rows: list, images: np.ndarray) -> dict[str, float]:
    """Robust and (when the scorer has modes) strict ShapesEval overall."""
    try:
        return {
            "robust": evaluate(rows, images, mode="robust")["overall"],
            "strict": evaluate(rows, images, mode="strict")["overall"],
        }
    except TypeError:  # a scorer without modes: the strict one
        return {"strict": evaluate(rows, images)["overall"]}


def run_variant(
    teacher: ToyTeacher,
    plan: PruningPlan,
    name: str,
    seed: int,
    args: argparse.Namespace,
    pairs: list,
    reference: tuple,
    out: Path,
) -> dict[str, Any]:
    spec = VARIANTS[name]
    model = teacher.transformer
    addon = PruningAddon.from_plan(model, plan, init=spec.get("init"))
    cfg = DistillConfig(
        mode=spec["mode"],
        chain_mix=spec.get("chain_mix", 0.0),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=max(1, args.steps // 20),
        checkpoint_every=0,
        log_every=10,
        seed=seed,
        teacher_reuse=args.teacher_reuse,
    )
    data = ToyDistillData(
        teacher,
        args.batch_size,
        seed=seed,
        timestep_sampling=args.timestep_sampling,
        caption_dropout=args.caption_dropout,
    )
    folder = out / f"{name}{args.tag}" / f"seed{seed}"
    t0 = time.perf_counter()
    distill_depth(model, addon, data, cfg, folder / "run")
    train_s = time.perf_counter() - t0
    rows: dict[str, Any] = {"train_s": round(train_s, 1)}
    apply_addon(model, addon)
    try:
        for level in plan.level_names:
            set_level(model, level)
            row = agreement(velocities(model, pairs), reference, SamplerConfig().guidance)
            prompts, images = shapes_images(teacher, model, args.per_category)
            np.save(folder / f"{level}_images.npy", images)
            row.update(score(prompts, images))
            rows[level] = row
    finally:
        remove_addon(model)
    (folder / "result.json").write_text(json.dumps(rows, indent=1))
    return rows


def rescore(out: Path, names: list[str], seeds: list[int], levels: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Re-score the kept images of finished runs with the current ShapesEval (robust and strict), no re-sampling."""
    prompts = [
        p for _ in (0, 1) for p in benchmark_prompts(int(len(np.load(next(out.glob("*/seed*/*_images.npy")))) // 8))
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        for seed in seeds:
            folder = out / name / f"seed{seed}"
            rows = json.loads((folder / "result.json").read_text())
            for level in levels:
                rows[level].update(score(prompts, np.load(folder / f"{level}_images.npy")))
            (folder / "result.json").write_text(json.dumps(rows, indent=1))
            results.setdefault(name, []).append(rows)
    return results


def mean_se(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():.3f} ± {se:.3f}"


def table(results: dict[str, list[dict[str, Any]]], levels: list[str], teacher_scores: dict[str, float]) -> str:
    keys = ["cosine", "guided_nmse", "direction_nmse", *teacher_scores]
    lines = [
        "| variant | level | " + " | ".join(keys) + " | train s |",
        "|---" * (len(keys) + 3) + "|",
        "| teacher | | 1 | 0 | 0 | " + " | ".join(f"{teacher_scores[k]:.3f}" for k in teacher_scores) + " | |",
    ]
    for name, runs in results.items():
        for level in levels:
            cells = [mean_se([r[level][k] for r in runs]) for k in keys]
            lines.append(
                f"| {name} | {level} | " + " | ".join(cells) + f" | {np.mean([r['train_s'] for r in runs]):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="pure,chain0.5,sequential")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--targets", default="0.25,0.375")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-reuse", type=int, default=1, help="data echoing: steps per teacher pass")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--timestep-sampling", default="uniform", help="training times: uniform or logit_normal")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty-prompt training samples")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/depth_recipes")
    parser.add_argument("--tag", default="", help="suffix of the variants' folders and table rows (e.g. -lr1e-3)")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="re-score the kept images of finished runs (variants x seeds) instead of training",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = ToyTeacher.load()
    plan = build_plan(teacher, tuple(float(t) for t in args.targets.split(",")), out)
    pairs = paired_batches(teacher, args.eval_batches, 32)
    reference = velocities(teacher.transformer, pairs)
    rows, images = shapes_images(teacher, teacher.transformer, args.per_category)
    teacher_scores = score(rows, images)
    results: dict[str, list[dict[str, Any]]] = {}
    if args.rescore:
        results = rescore(out, args.variants.split(","), [int(s) for s in args.seeds.split(",")], plan.level_names)
    for name in [] if args.rescore else args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.setdefault(name + args.tag, []).append(
                run_variant(teacher, plan, name, seed, args, pairs, reference, out)
            )
            print(name + args.tag, seed, json.dumps(results[name + args.tag][-1]), flush=True)
    body = (
        f"Plan (toy teacher analysis, targets {args.targets}):\n\n```\n{plan.summary()}\n```\n\n"
        + (
            "Re-scored images of finished runs; each variant's steps and teacher reuse are in its tag (train s as "
            "measured then, at that run's threads); "
            if args.rescore
            else f"{args.steps} depth steps at batch {args.batch_size}, lr {args.lr}, teacher reuse {args.teacher_reuse}, "
            f"times {args.timestep_sampling}, caption dropout {args.caption_dropout}, "
        )
        + f"seeds {args.seeds}; ShapesEval "
        f"{args.per_category} prompts per category x 2 seeds; mean ± standard error over seeds.\n\n"
        + table(results, plan.level_names, teacher_scores)
    )
    print(body)
    if not args.no_append:
        append("Depth recipes: pure non-sequential vs chain-aware vs sequential (toy teacher)", body)


if __name__ == "__main__":
    main()
