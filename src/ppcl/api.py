"""The Python API's verbs that span several packages (re-exported from :mod:`ppcl`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ppcl.analysis import AnalysisConfig, RedundancyReport, plan_from_report
from ppcl.analysis import analyze as _analyze
from ppcl.data.calibration import CalibrationSet
from ppcl.plan import PruningPlan


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
                 init: str = "first") -> PruningPlan:
    """A PruningPlan with nested levels, one per target, from the report's intervals (cheapest first)."""
    return plan_from_report(report, model_config, targets, target_kind, level_names, init)
