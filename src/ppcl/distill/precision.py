"""Float32 master weights for the trained modules of a low-precision base (DESIGN.md "Precision").

A student is a copy of a teacher block, so on a bf16/fp16 base it is born bf16/fp16. AdamW stepping such weights
directly loses most updates to rounding: bf16 keeps 8 significant bits, so an update below 2⁻⁹–2⁻⁸ of a weight's
magnitude rounds away (measured on a tiny Qwen-Image at lr 1e-5: 2.7% of the elements moved in 10 steps, and the
update had cosine 0.15 with the float32 one). :class:`TrainingSession <ppcl.distill.trainer.TrainingSession>`
therefore, for the parameters a stage hands to ``run`` (students, projections, a full fine-tune's base blocks),

* upcasts every trained low-precision parameter to float32 *in place* (``p.data = p.data.float()``: the same
  ``Parameter`` objects, so the stage's step module, the optimiser, the sharding twins and the checkpoint keys are
  unaffected) for the length of the run (:class:`MasterWeights`);
* runs each step under ``torch.autocast`` to the base dtype (:func:`autocast_dtype`), so matmuls of the float32
  students run in the base's precision, as the same weights will at inference on that base;
* puts every parameter back into the dtype it came in when the session ends, errors included.

The frozen teacher stays in the base dtype throughout: a full fine-tune's copy of the original base weights
(``FinetuneStep.originals``) is taken when the step is built, before ``run`` upcasts. Inside the model the runtime keeps
the stream dtype: a student's outputs are cast back to the dtype of the streams it was given
(:func:`ppcl.runtime.width.like_input`), and projections switch autocast off to keep their float32 map, so training
sees the arithmetic of inference.

What lands where (chosen for a user who trains on a bf16 base and deploys on it):

* ``OUT/checkpoint`` holds the float32 masters (and AdamW's float32 moments), so a resumed run continues from exactly
  the state an uninterrupted one has; it is still a valid add-on folder (loading it on the bf16 base casts the
  students to the base's dtype, as any add-on load does).
* ``OUT/addon`` and the in-memory add-on after the run hold each module in the dtype it came in: students in the base
  dtype (half the size of float32, and bit for bit what runs once applied to that base: students are rebuilt from the
  base's blocks on load, so float32 weights would be cast to the base dtype anyway), projections in float32 (they are
  made float32 and keep it: their residual map runs in float32 on any base). The provenance of the stage records
  ``precision`` (base dtype, master dtype, autocast).

A float32 base has nothing to upcast and no autocast is added: its runs are bit-identical to training without this
module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ppcl.logging import get_logger

log = get_logger("distill")

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
"""Parameter dtypes that get float32 master weights while they train."""


def base_dtype(model: nn.Module, skip: str = "ppcl") -> torch.dtype:
    """The dtype holding most of ``model``'s floating parameters, leaving out the submodule ``skip`` (an applied
    add-on's students); float32 for a model without floating parameters."""
    counts: dict[torch.dtype, int] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point() and name.split(".", 1)[0] != skip:
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=lambda dtype: counts[dtype]) if counts else torch.float32


def autocast_dtype(base: torch.dtype, mixed_precision: str) -> torch.dtype | None:
    """The dtype the trainer autocasts a step to: the base's when it is low precision and accelerate's mixed precision
    does not autocast already (``"no"``), else ``None`` (accelerate's own autocast, or none, applies)."""
    if base not in LOW_PRECISION or mixed_precision != "no":
        return None
    if base == torch.float16:
        # Without loss scaling small fp16 activation gradients flush to zero; accelerate's fp16 mode adds a scaler.
        log.warning(
            "training on a float16 base under float16 autocast without loss scaling; on a GPU, "
            "mixed_precision='fp16' (--mixed-precision fp16) adds a gradient scaler"
        )
    return base


class MasterWeights:
    """Float32 masters of the low-precision parameters among ``params`` (in place), until :meth:`restore`.

    Float32 (or float64) parameters are not touched, so a float32 run is exactly what it was without this class.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        seen: set[int] = set()
        self.upcast: list[tuple[nn.Parameter, torch.dtype]] = []
        for param in params:
            if id(param) in seen or param.dtype not in LOW_PRECISION:
                continue
            seen.add(id(param))
            self.upcast.append((param, param.dtype))
            param.data = param.data.float()  # new storage, same Parameter object

    def restore(self) -> None:
        """Round every upcast parameter back to its own dtype (idempotent). Gradients are dropped: they are float32
        and would no longer match their parameter."""
        for param, dtype in self.upcast:
            param.grad = None
            param.data = param.data.to(dtype)
        self.upcast = []


def precision_record(base: torch.dtype, autocast: torch.dtype | None, mixed_precision: str) -> dict[str, Any]:
    """The ``precision`` entry of a stage's provenance: base dtype, master dtype, autocast, what the files hold."""

    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    accelerate = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)  # its autocast, when it has one
    return {
        "base_dtype": name(base),
        "master_dtype": "float32",
        "autocast": name(autocast) if autocast is not None else accelerate,
        "saved": "each module in the dtype it came in (students: the base's); checkpoints: float32 masters",
    }
