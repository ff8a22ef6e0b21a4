"""The Python API's verbs that span several packages (re-exported from :mod:`ppcl`): a thin façade, each verb one
call into the package that does the work."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ppcl.analysis import AnalysisConfig, RedundancyReport
from ppcl.analysis import analyze as _analyze
from ppcl.analysis.baselines import spans_for_removed
from ppcl.analysis.intervals import Interval
from ppcl.data.calibration import CalibrationSet
from ppcl.plan import PruningPlan, plan_from_report, plan_from_spans
from ppcl.plan.from_report import WIDTH_SUFFIX, add_width_levels
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR

__all__ = ["WIDTH_SUFFIX", "add_width_levels", "analyze", "calibrate", "plan_from_removed", "propose_plan"]


def calibrate(
    source: Any,
    prompts: list[str] | None = None,
    seeds: tuple[int, ...] = (0,),
    n_timesteps: int = 6,
    num_inference_steps: int = 20,
    **kwargs: Any,
) -> CalibrationSet:
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


def analyze(
    model: Any, calibration: CalibrationSet, config: AnalysisConfig | None = None, **overrides: Any
) -> RedundancyReport:
    """Redundancy analysis of ``model`` on ``calibration``; ``overrides`` replace fields of ``config``."""
    base = config or AnalysisConfig()
    return _analyze(model, calibration, AnalysisConfig(**{**base.__dict__, **overrides}))


def propose_plan(
    report: RedundancyReport,
    model_config: Any,
    targets: Sequence[float] = (0.25, 0.4, 0.5),
    target_kind: str = "fraction",
    level_names: Sequence[str] | None = None,
    init: str = "first",
    *,
    guard_factor: float = DEFAULT_GUARD_FACTOR,
    guard_floor: float = DEFAULT_GUARD_FLOOR,
) -> PruningPlan:
    """A PruningPlan with nested levels, one per target, from the report's intervals (cheapest first).

    The budget guard refuses an interval scoring more than ``guard_factor`` (default 10; 0 = off) times the largest
    accepted score; a level that would need it undershoots its target, and ``plan.notes`` says so. Levels that would
    be identical are merged into the first (see :func:`ppcl.plan.plan_from_intervals`).
    """
    return plan_from_report(
        report,
        model_config,
        targets,
        target_kind,
        level_names,
        init,
        guard_factor=guard_factor,
        guard_floor=guard_floor,
    )


def plan_from_removed(
    removed: Iterable[Interval],
    model_class: type | str,
    model_config: Mapping[str, Any],
    level_name: str = "removed",
    *,
    protect_first: int = 2,
    protect_last: int = 2,
    provenance: Mapping[str, Any] | None = None,
) -> PruningPlan:
    """A one-level plan that removes exactly the blocks of ``removed`` (dropped-block intervals, e.g. a baseline's):
    each maximal run ``a..b`` becomes the span ``[a - 1, b]`` (inclusive) with a student copied from block ``a - 1``
    (:func:`ppcl.analysis.baselines.spans_for_removed`, then :func:`ppcl.plan.plan_from_spans`)."""
    return plan_from_spans(
        spans_for_removed(removed),
        model_class,
        model_config,
        level_name,
        protect_first=protect_first,
        protect_last=protect_last,
        provenance=provenance,
    )
