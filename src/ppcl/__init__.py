"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multi-modal diffusion transformers.

Data flows through artefacts: CalibrationSet → RedundancyReport → PruningPlan → PruningAddon → merged model::

    import ppcl
    calib = ppcl.calibrate(pipeline, prompts, seeds=(0, 1))        # or a ppcl.toy ToyTeacher
    report = ppcl.analyze(pipeline.transformer, calib)
    plan = ppcl.propose_plan(report, pipeline.transformer.config, targets=(0.25, 0.4, 0.5))
"""

from ppcl.analysis import AnalysisConfig, RedundancyReport
from ppcl.api import analyze, calibrate, propose_plan
from ppcl.data.calibration import CalibrationSet
from ppcl.errors import PPCLError
from ppcl.plan import PruningPlan

__version__ = "0.1.0"

__all__ = [
    "AnalysisConfig",
    "CalibrationSet",
    "PPCLError",
    "PruningPlan",
    "RedundancyReport",
    "__version__",
    "analyze",
    "calibrate",
    "propose_plan",
]
