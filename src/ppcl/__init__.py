"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multi-modal diffusion transformers.

Data flows through artefacts: CalibrationSet → RedundancyReport → PruningPlan → PruningAddon → merged model::

    import ppcl
    calib = ppcl.calibrate(pipeline, prompts, seeds=(0, 1))        # or a ppcl.toy ToyTeacher
    report = ppcl.analyze(pipeline.transformer, calib)
    plan = ppcl.propose_plan(report, pipeline.transformer.config, targets=(0.25, 0.4, 0.5))
    plan = ppcl.add_width_levels(plan, report)                     # + levels "p25+w"... (text runs, FFN blocks)
    addon = ppcl.PruningAddon.from_plan(pipeline.transformer, plan)   # then train it (ppcl.distill)
    ppcl.apply_addon(pipeline.transformer, addon, level="p40")      # in place, reversible
    small = ppcl.merge(pipeline.transformer, addon, "p40")          # a new, smaller stock diffusers model
    small = ppcl.load_merged("merged/")                             # a folder written by `ppcl merge` (any level)
    pipe = ppcl.load_pipeline(None, "runs/distill/addon", level="p40")   # toy (or a local pipeline folder) + add-on
"""

from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, RedundancyReport
from ppcl.api import add_width_levels, analyze, calibrate, plan_from_removed, propose_plan
from ppcl.data.calibration import CalibrationSet
from ppcl.errors import PPCLError
from ppcl.pipeline import ToyPipeline, load_pipeline
from ppcl.plan import PruningPlan
from ppcl.runtime import (
    apply_addon,
    disabled,
    load_merged,
    merge,
    remap_lora_state_dict,
    remove_addon,
    set_level,
)
from ppcl.version import __version__

__all__ = [
    "AnalysisConfig",
    "CalibrationSet",
    "PPCLError",
    "PruningAddon",
    "PruningPlan",
    "RedundancyReport",
    "ToyPipeline",
    "__version__",
    "add_width_levels",
    "analyze",
    "apply_addon",
    "calibrate",
    "disabled",
    "load_merged",
    "load_pipeline",
    "merge",
    "plan_from_removed",
    "propose_plan",
    "remap_lora_state_dict",
    "remove_addon",
    "set_level",
]
