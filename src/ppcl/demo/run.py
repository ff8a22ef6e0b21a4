"""The whole method on the committed toy teacher: calibrate → analyze → plan → depth → width → fine-tune → eval.

Levels (nominal share of the teacher's *block* parameters removed; the toy's 16 blocks make the real figures coarse):

* ``p25``: the cheapest depth spans reaching 25% (on the committed teacher: 2 spans, 31.2%);
* ``p40``: the next depth span on top (3 spans, 37.5%: the toy has no set of spans nearer 40%);
* ``p50``: ``p40``'s depth spans + the text-stream runs whose text CKA is at least 0.99 + FFN → linear maps on
  ``ffn_blocks`` = 4 blocks (52.1%). Width on top of a depth level is the paper's recipe (12B depth + width → 10B).
  On the toy, text-stream runs in the early blocks (text CKA 0.95-0.98) cost the two-object and position prompts
  most, so the demo prunes only the nearly unchanged late text stream and replaces more FFNs instead
  (benchmarks/RESULTS.md, "Width sub-levels of a trained demo add-on" and "Demo variants").

One non-sequential, chain-aware depth training serves every level (pluggability); the width projections are trained
for ``p50``; the fine-tune trains the add-on parameters of every level (one level drawn per batch), so every level
still runs on the original teacher and none is left behind by a fine-tune of another level that shares its students.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, RedundancyReport, analyze
from ppcl.demo.config import DEPTH_LEVELS, DEPTH_TARGETS, LEVELS, TOP_LEVEL, TOP_MIN_REMOVED, DemoConfig, DemoResult
from ppcl.demo.report import GRID_PROMPTS, make_figures, sample_rows, write_html
from ppcl.distill import DistillConfig, FinetuneObjective, distill_depth, distill_width, finetune
from ppcl.distill.config import DEFAULT_WARMUP_SHARE
from ppcl.errors import ConfigError
from ppcl.eval.guided import paired_toy_batches, predict_pairs
from ppcl.eval.levels import evaluate_levels
from ppcl.eval.metrics import guided_agreement, velocity_agreement
from ppcl.io import write_json
from ppcl.logging import get_logger
from ppcl.outputs import DEMO, is_kind, write_marker
from ppcl.plan import PruningPlan, add_width_levels, plan_from_report
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.sampler import SamplerConfig
from ppcl.toy.teacher import ToyTeacher

log = get_logger("demo")


class _Clock:
    """Wall time per stage, logged at every stage boundary."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("demo: %s ...", name)
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        log.info("demo: %s done in %.1f s", name, self.timings[name])
        return out


def make_plan(
    report: RedundancyReport,
    model_config: Any,
    ffn_blocks: int,
    width_base: str,
    text_cka_threshold: float | None,
    min_top_removed: float = TOP_MIN_REMOVED,
) -> PruningPlan:
    """The demo's three levels (module docstring) from ``report``: the top level is ``width_base``'s depth spans plus
    the width replacements, and must remove at least ``min_top_removed`` of the block parameters."""
    if width_base not in DEPTH_LEVELS:
        raise ConfigError("unknown width base level", expected=f"one of {list(DEPTH_LEVELS)}", found=repr(width_base))
    depth = plan_from_report(report, model_config, DEPTH_TARGETS, level_names=DEPTH_LEVELS)
    width = add_width_levels(depth, report, threshold=text_cka_threshold, ffn_blocks=ffn_blocks, suffix="+w")
    source = width.level(f"{width_base}+w")
    levels = [lv for lv in width.levels if lv.name in DEPTH_LEVELS]
    top = dataclasses.replace(source, name=TOP_LEVEL)  # keeps its interval scores for the summary
    used = {rid for lv in [*levels, top] for rid in lv.replacement_ids}
    replacements = [r for r in width.replacements if r.id in used]
    plan = dataclasses.replace(width, replacements=replacements, levels=[*levels, top]).validate()
    if plan.level_names != list(LEVELS):
        # The budget guard may stop a level short or drop one that would repeat another: the demo's fixed levels
        # then do not exist, and training must not start.
        raise ConfigError(
            "the demo's levels do not fit this teacher's analysis",
            expected=f"levels {list(LEVELS)}",
            found=f"levels {plan.level_names}; notes: {'; '.join(plan.notes) or 'none'}",
            fix="run the stages by hand (README 'Width levels, training stages') with targets that fit",
        )
    removed = plan.param_count(model_config, TOP_LEVEL).block_fraction_removed
    if removed < min_top_removed:
        # "p50" is a promise to the reader of the report: a top level that removes less must not be shown as one.
        raise ConfigError(
            f"the demo's {TOP_LEVEL} level removes too little",
            expected=f">= {min_top_removed:.0%} of the block parameters removed",
            found=f"{removed:.1%} ({source.name}'s spans + "
            f"{ffn_blocks} FFN linears + the text runs at text CKA >= {text_cka_threshold})",
            fix="raise ffn_blocks or lower text_cka_threshold (DemoConfig), or run the stages by hand",
        )
    return plan


def run_demo(
    out: Path,
    config: DemoConfig,
    teacher: ToyTeacher | None = None,
    command: str = "ppcl demo",
    teacher_folder: Path | None = None,
) -> DemoResult:
    """Run every stage into ``out``: ``analysis/``, ``plan/``, ``depth/``, ``width/``, ``finetune/`` (each training
    stage leaves a valid add-on under ``<stage>/addon``; ``finetune/addon`` is the final one), ``results.json``,
    ``figures/*.png`` and the self-contained ``report.html`` (:mod:`ppcl.demo.report`).

    The teacher is ``teacher`` if given, else the one saved in ``teacher_folder`` (``ppcl toy train-teacher``), else
    the committed one; its card is read from ``teacher_folder`` (default: the committed teacher's).
    """
    _clear_previous_run(out)
    clock = _Clock()
    teacher = teacher or clock.stage("load the toy teacher", lambda: ToyTeacher.load(teacher_folder))
    model = teacher.transformer
    calibration = clock.stage(
        "calibrate", lambda: calibrate_toy(teacher, config.calib_prompts, n_timesteps=config.calib_timesteps)
    )
    report = clock.stage("analyze", lambda: analyze(model, calibration, AnalysisConfig(seed=config.seed)))
    report.save(out / "analysis")
    plan = make_plan(
        report, model.config, config.ffn_blocks, config.width_base, config.text_cka_threshold, config.min_top_removed
    )
    plan.save(out / "plan")
    log.info("demo: plan\n%s", plan.summary())
    addon = PruningAddon.from_plan(model, plan, init=config.init)
    data = ToyDistillData(teacher, config.batch_size, seed=config.seed, caption_dropout=config.caption_dropout)
    paired = paired_toy_batches(teacher, config.eval_batches, 32)
    held_out = [ToyDistillData(teacher, 32, seed=12345).batch(i) for i in range(config.eval_batches)]
    stages: list[dict[str, Any]] = []
    depth_config = dataclasses.replace(
        _train_config(config, config.depth_steps), chain_mix=config.chain_mix, lr=config.depth_lr
    )
    clock.stage(
        "depth distillation (non-sequential, chain-aware)",
        lambda: distill_depth(model, addon, data, depth_config, out / "depth"),
    )
    stages.append(_agreement(model, addon, paired, f"depth (non-sequential, chain mix {config.chain_mix:g})"))
    clock.stage(
        "width distillation",
        lambda: distill_width(
            model,
            addon,
            data,
            _train_config(config, config.width_steps),
            out / "width",
            level=TOP_LEVEL,
            calibration=calibration,
        ),
    )
    stages.append(_agreement(model, addon, paired, "+ width (least squares, then trained)"))
    objective = FinetuneObjective(
        guidance=config.finetune_guidance,
        direction_weight=config.finetune_direction_weight,
        levels=tuple(lv for lv in LEVELS if lv != TOP_LEVEL),
        level_mode=config.finetune_level_mode,
        seed=config.seed,
    )  # type: ignore[arg-type]
    clock.stage(
        "fine-tune",
        lambda: finetune(
            model,
            addon,
            data,
            _train_config(config, config.finetune_steps),
            out / "finetune",
            level=TOP_LEVEL,
            objective=objective,
        ),
    )
    stages.append(
        _agreement(
            model,
            addon,
            paired,
            f"+ fine-tune of every level (add-on parameters only, "
            f"guidance {config.finetune_guidance}, "
            f"{config.finetune_level_mode})",
        )
    )
    shapes = {"n_per_category": config.per_category}
    # Guided metrics on as many captioned pairs as unguided held-out batches; the PSNR on the ShapesEval images
    # (teacher and level at equal prompts and noise), so it costs no sampling of its own.
    levels = clock.stage(
        "evaluate every level",
        lambda: evaluate_levels(
            model, addon, held_out, list(LEVELS), config.latency_repeats, teacher, shapes, paired=paired
        ),
    )
    result = DemoResult(
        config,
        _card(teacher, teacher_folder),
        plan.summary(),
        levels,
        stages,
        clock.timings,
        _level_blocks(plan),
        [(i.u, i.v) for i in report.intervals],
        command=command,
    )
    prompts = GRID_PROMPTS[: config.grid_prompts]
    grid, captions = clock.stage("sample grid", lambda: sample_rows(teacher, addon, LEVELS, prompts, config.grid_seeds))
    result.timings["total"] = round(time.perf_counter() - clock.start, 1)
    made = make_figures(out, result.to_json(), report, plan, grid, captions)
    result.figures = {k: str(v.relative_to(out)) for k, v in made.items()}
    write_json(result.to_json(), out / "results.json")
    path = write_html(out, result.to_json(), made, command)
    log.info("demo: finished in %.0f s; report at %s", time.perf_counter() - clock.start, path)
    return result


STAGE_DIRS = ("analysis", "plan", "depth", "width", "finetune", "figures")


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier demo run left in ``out`` (only the demo's own sub-folders and files), so a second
    ``ppcl demo`` starts fresh instead of refusing to overwrite a finished training run; then mark ``out`` as a demo
    folder. A folder that is neither new, empty nor a demo's is refused: the demo never deletes a user's files.

    Raises:
        ConfigError: ``out`` is a file, a symlink, or a non-empty folder no demo wrote.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(
            "the demo's output is not a folder",
            expected="a new, empty or demo folder",
            found=f"{out} is a {'symlink' if out.is_symlink() else 'file'}",
            fix="pick another --out",
        )
    if out.is_dir() and any(out.iterdir()) and not is_kind(out, DEMO):
        raise ConfigError(
            "the demo's output folder holds files no demo wrote",
            expected="a new, empty or demo folder",
            found=f"{out} is not empty",
            fix="pick another --out (the demo replaces only its own folders)",
        )
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, DEMO)
    old = [out / d for d in STAGE_DIRS if (out / d).exists()]
    for path in old:
        shutil.rmtree(path)
    for name in ("results.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    if old:
        log.info("demo: replaced the previous run in %s", out)


def _train_config(config: DemoConfig, steps: int) -> DistillConfig:
    return DistillConfig(
        steps=steps,
        lr=config.lr,
        batch_size=config.batch_size,
        warmup=max(1, round(steps * DEFAULT_WARMUP_SHARE)),
        checkpoint_every=0,
        log_every=max(1, min(10, steps // 10)),
        seed=config.seed,
        teacher_reuse=config.teacher_reuse,
    )


@torch.no_grad()
def _agreement(model: torch.nn.Module, addon: PruningAddon, pairs: list[Any], stage: str) -> dict[str, Any]:
    """Velocity cosine and guided-velocity NMSE of every level after one stage (cheap: no sampling), on held-out
    cond/uncond pairs at the sampler's guidance."""
    guidance = SamplerConfig().guidance
    apply_addon(model, addon)
    try:

        def predict(level: str | None) -> tuple[torch.Tensor, torch.Tensor]:
            set_level(model, level)
            return predict_pairs(model, pairs)

        reference = predict(None)
        row: dict[str, Any] = {"stage": stage}
        for lv in LEVELS:
            pruned = predict(lv)
            row[lv] = velocity_agreement(pruned[0], reference[0])["cosine"]
            row[f"{lv} guided NMSE"] = guided_agreement(*pruned, *reference, guidance)["guided_nmse"]
    finally:
        remove_addon(model)
    log.info(
        "demo: after %s: velocity cosine / guided NMSE %s",
        stage,
        ", ".join(f"{lv} {row[lv]:.4f} / {row[f'{lv} guided NMSE']:.4f}" for lv in LEVELS),
    )
    return row


def _card(teacher: ToyTeacher, folder: Path | None) -> dict[str, Any]:
    from ppcl.toy.teacher import load_card

    card = load_card(folder)
    return {
        "folder": str(folder) if folder is not None else "committed",
        "config": card["config"],
        "steps": card["train"]["steps"],
        "command": card["command"],
        "params": sum(p.numel() for p in teacher.transformer.parameters()),
    }


def _level_blocks(plan: PruningPlan) -> dict[str, dict[str, list[int]]]:
    """Per level: blocks removed by depth spans, text-pruned blocks, FFN-linear blocks (flat indices)."""
    from ppcl.plan import FFNLinear, TextRun

    out = {}
    for name in plan.level_names:
        reps = plan.replacements_of(name)
        out[name] = {
            "removed": sorted(plan.removed_blocks(name)),
            "text_pruned": sorted(j for r in reps if isinstance(r, TextRun) for j in r.pruned_blocks()),
            "ffn_linear": sorted(r.block for r in reps if isinstance(r, FFNLinear)),
        }
    return out
