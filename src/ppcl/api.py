"""The Python API's verbs that span several packages (re-exported from :mod:`ppcl`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ppcl.analysis import AnalysisConfig, RedundancyReport, plan_from_report
from ppcl.analysis import analyze as _analyze
from ppcl.data.calibration import CalibrationSet
from ppcl.plan import PruningPlan
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR


def calibrate(source: Any, prompts: list[str] | None = None, seeds: tuple[int, ...] = (0,), n_timesteps: int = 6,
              num_inference_steps: int = 20, **kwargs: Any) -> CalibrationSet:
    """Capture a CalibrationSet from a :class:`~ppcl.toy.teacher.ToyTeacher` or a diffusers pipeline object.

    Toy: ``prompts`` default to ``kwargs.get("num_prompts", 32)`` ShapesWorld captions. Pipelines: ``prompts`` (or
    ``prompt_embeds=[...]``) and any pipeline call arguments (height, width, guidance) in ``kwargs``.
    """
    from ppcl.toy.teacher import ToyTeacher

    if isinstance(source, ToyTeacher):
        from ppcl.toy.calibrate import calibrate_toy, calibrate_toy_prompts
        from ppcl.toy.sampler import SamplerConfig

        sampler = SamplerConfig(steps=num_inference_steps, guidance=kwargs.pop("guidance", 4.0))
        if prompts is None:
            return calibrate_toy(source, kwargs.pop("num_prompts", 32), seeds, n_timesteps, sampler)
        return calibrate_toy_prompts(source, prompts, seeds, n_timesteps, sampler)
    from ppcl.data.pipeline_capture import calibrate_pipeline

    return calibrate_pipeline(source, prompts, seeds, num_inference_steps, n_timesteps, **kwargs)


def analyze(model: Any, calibration: CalibrationSet, config: AnalysisConfig | None = None,
            **overrides: Any) -> RedundancyReport:
    """Redundancy analysis of ``model`` on ``calibration``; ``overrides`` replace fields of ``config``."""
    base = config or AnalysisConfig()
    return _analyze(model, calibration, AnalysisConfig(**{**base.__dict__, **overrides}))


def propose_plan(report: RedundancyReport, model_config: Any, targets: Sequence[float] = (0.25, 0.4, 0.5),
                 target_kind: str = "fraction", level_names: Sequence[str] | None = None,
                 init: str = "first", *, guard_factor: float = DEFAULT_GUARD_FACTOR,
                 guard_floor: float = DEFAULT_GUARD_FLOOR) -> PruningPlan:
    """A PruningPlan with nested levels, one per target, from the report's intervals (cheapest first).

    The budget guard refuses an interval scoring more than ``guard_factor`` (default 10; 0 = off) times the largest
    accepted score; a level that would need it undershoots its target, and ``plan.notes`` says so. Levels that would
    be identical are merged into the first (see :func:`ppcl.plan.propose_plan`).
    """
    return plan_from_report(report, model_config, targets, target_kind, level_names, init,
                            guard_factor=guard_factor, guard_floor=guard_floor)


WIDTH_SUFFIX = "+w"


def add_width_levels(plan: PruningPlan, report: RedundancyReport, *, threshold: float | None = None,
                     ffn_blocks: int = 2, suffix: str = WIDTH_SUFFIX) -> PruningPlan:
    """A copy of ``plan`` with, for each depth level ``X``, a level ``X + suffix`` = ``X`` + width replacements.

    Text runs and FFN blocks come from :func:`ppcl.plan.width_select.select_width` on ``report``, then are fitted to
    each level: a run's ends may not be blocks that ``X``'s depth spans remove, so the last block moves back to the
    nearest kept one and a removed anchor moves forward (kept only if the report's text CKA from the new anchor still
    meets ``threshold``); FFN blocks are chosen among the blocks ``X`` keeps. A plan without levels gets one level
    ``"w"`` (width only). The result is validated.

    Args:
        plan: a plan made from ``report`` (same model).
        report: the RedundancyReport (``text_cka``, ``ffn_rel_error``).
        threshold: minimum text-stream CKA of a run (default: the selector's, 0.95).
        ffn_blocks: FFN blocks replaced per level.
        suffix: appended to each depth level's name.

    Raises:
        ConfigError: bad ``threshold``/``ffn_blocks``, or a level name that already exists.
    """
    from ppcl.errors import ConfigError
    from ppcl.plan.width_select import (
        DEFAULT_TEXT_CKA_THRESHOLD,
        dual_stream_blocks,
        select_ffn_blocks,
        select_width,
        with_width_level,
    )

    cut = DEFAULT_TEXT_CKA_THRESHOLD if threshold is None else float(threshold)
    runs, _ = select_width(report, threshold=cut, ffn_k=0)
    allowed = dual_stream_blocks(report.arch, report.stack_sizes)
    bases: list[str | None] = list(plan.level_names) or [None]
    out = plan
    for base in bases:
        name = f"{base}{suffix}" if base is not None else "w"
        if name in out.level_names:
            raise ConfigError(f"The plan already has a level {name!r}", expected="new width level names",
                              found=f"levels {out.level_names}", fix="pass a plan without width levels")
        gone = set(plan.removed_blocks(base)) if base is not None else set()
        fitted = _fit_runs(runs, gone, report.text_cka, cut)
        pruned = [j for a, b in fitted for j in range(a + 1, b + 1)]
        ffns = select_ffn_blocks(report.ffn_rel_error, ffn_blocks, text_pruned=pruned,
                                 allowed=[i for i in allowed if i not in gone])
        if not fitted and not ffns:
            continue  # nothing to add on top of this level: no empty twin
        desc = (f"{base or 'teacher'} + {len(fitted)} text run(s) (inclusive {fitted}) + FFN blocks "
                f"{[f.block for f in ffns]}")
        out = with_width_level(out, name, fitted, ffns, base_level=base, description=desc)
    return out


def _fit_runs(runs: Sequence[tuple[int, int]], gone: set[int], text_cka: Any,
              threshold: float) -> list[tuple[int, int]]:
    """Inclusive runs moved off depth-removed ends (see :func:`add_width_levels`)."""
    import numpy as np

    cka = np.asarray(text_cka, dtype=np.float64)
    fitted = []
    for a, b in runs:
        while b in gone and b > a:
            b -= 1
        moved = a
        while a in gone and a < b:
            a += 1
        # A run needs a kept block after its anchor; a moved anchor must still see high text CKA to the run's end.
        if b <= a or not any(j not in gone for j in range(a + 1, b + 1)):
            continue
        if moved != a and not all(np.isfinite(cka[a + 1, k]) and cka[a + 1, k] >= threshold
                                  for k in range(a + 2, b + 2)):
            continue
        fitted.append((a, b))
    return fitted
