"""The embedded toy world: ShapesWorld, the committed toy teacher, its sampler, ShapesEval and a distillation data
source (``from ppcl.toy import ToyTeacher, ToyDistillData``)."""

from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher

__all__ = ["ToyDistillData", "ToyTeacher"]
