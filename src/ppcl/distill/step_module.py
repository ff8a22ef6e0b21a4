"""The contract between :class:`~ppcl.distill.session.TrainingSession` and a stage's step module.

A step module (:class:`~ppcl.distill.depth.DepthStep`, :class:`~ppcl.distill.width.WidthStep`,
:class:`~ppcl.distill.finetune.FinetuneStep`) computes one micro-batch's losses from ONE teacher pass. The loop
(:class:`~ppcl.distill.stage_run.StageRun`) sets, before every call, which micro-batch it is and whether to measure
it; it reads ``timing["teacher_s"]`` after a measured call (optional) and may swap ``students`` for their shards.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ppcl.distill.echo import TeacherEcho


@runtime_checkable
class StepModule(Protocol):
    """What the training loop drives.

    Attributes:
        students: the trained modules by add-on key (the loop replaces it by sharded twins under FSDP).
        echo: the teacher-pass cache for data echoing (``teacher_reuse``), installed by the loop.
        measure: set by the loop: time this call (``timing["teacher_s"]``: seconds of its teacher pass).
        micro_index: the step's micro-batch index ``step * accumulation + micro`` (the same on every process).
        data_index: the index of the batch drawn from the data source (differs between processes; ``None`` before
            the first call).
    """

    students: nn.ModuleDict
    echo: TeacherEcho
    measure: bool
    micro_index: int
    data_index: int | None

    def __call__(self, **batch: Any) -> dict[str, Tensor]:
        """``{term: scalar loss}`` for one micro-batch (the transformer's keyword arguments)."""
        ...
