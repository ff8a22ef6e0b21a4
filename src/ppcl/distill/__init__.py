"""Distillation of the add-on's students against the frozen teacher (METHOD.md stage 1.3).

Example (toy world)::

    from ppcl.addon import PruningAddon
    from ppcl.distill import DistillConfig, distill_depth
    from ppcl.toy.distill_data import ToyDistillData

    addon = PruningAddon.from_plan(teacher.transformer, plan)
    data = ToyDistillData(teacher, batch_size=16, seed=0)
    addon = distill_depth(teacher.transformer, addon, data, DistillConfig(steps=500, batch_size=16), "runs/distill")

``losses`` is pure maths; ``data`` hands out seeded batches (``latent_data``: from a ``ppcl cache`` latent cache); ``depth`` computes one step's per-span losses from ONE
teacher pass; ``width`` initialises projections by least squares and trains them non-sequentially (stage 2);
``finetune`` distils one level end to end (stage 3); ``trainer`` runs the accelerate loop with atomic checkpoints
and exact resume for all three.
"""

from ppcl.distill.data import CalibrationData, DistillData
from ppcl.distill.depth import DepthStep, depth_replacements, sequential_level
from ppcl.distill.finetune import FLOW_TARGET_KEY, FinetuneStep, finetune
from ppcl.distill.latent_data import LatentCacheData
from ppcl.distill.losses import depth_loss, normalized_mse
from ppcl.distill.objective import FinetuneObjective
from ppcl.distill.trainer import DistillConfig, TrainingSession, distill_depth
from ppcl.distill.width import WidthStep, distill_width, init_width_projections, width_positions

__all__ = [
    "FLOW_TARGET_KEY",
    "CalibrationData",
    "DepthStep",
    "DistillConfig",
    "DistillData",
    "FinetuneObjective",
    "FinetuneStep",
    "LatentCacheData",
    "TrainingSession",
    "WidthStep",
    "depth_loss",
    "depth_replacements",
    "distill_depth",
    "distill_width",
    "finetune",
    "init_width_projections",
    "normalized_mse",
    "sequential_level",
    "width_positions",
]
