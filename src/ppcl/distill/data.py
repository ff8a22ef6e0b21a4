"""Where distillation batches come from.

A :class:`DistillData` hands out the transformer's forward keyword arguments for training step ``step``. Every
batch is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would
have seen and the trainer only needs to remember the step number.

The index a source receives is the trainer's micro-batch index ``(step * accumulation + micro) * P + rank`` for ``P``
processes, so the data of a multi-process run is a pure function of ``(seed, step, rank)`` and the processes never
draw the same batch (see :mod:`ppcl.distill.trainer`).

Sources: :class:`CalibrationData` here, :class:`~ppcl.distill.latent_data.LatentCacheData` (a ``ppcl cache``) and, for
the toy world, :class:`ppcl.toy.distill_data.ToyDistillData` (in ``ppcl.toy``: distillation never imports the toy).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ppcl.data.calibration import CalibrationSet
from ppcl.errors import ConfigError
from ppcl.storage import compute_dtype


@runtime_checkable
class DistillData(Protocol):
    """A deterministic source of transformer inputs.

    A source may also have ``match_model(model)``: the trainer calls it once before training (e.g. to cast captured
    inputs to the model's dtype)."""

    def batch(self, step: int) -> dict[str, Any]:
        """Keyword arguments of ``transformer(**batch)`` for micro-batch ``step`` (same ``step`` → same batch)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in the add-on's provenance."""
        ...


class CalibrationData:
    """Cycles through a :class:`~ppcl.data.calibration.CalibrationSet` in seeded-shuffled order.

    Epoch ``e`` visits the samples in the order ``default_rng([seed, e]).permutation(N)``, cut into
    ``N // batch_size`` full batches (the remainder differs from epoch to epoch, so every sample is still used).

    Args:
        calibration: captured transformer inputs.
        batch_size: samples per batch (at most the number of samples).
        seed: shuffle seed.
        dtype: the model's parameter dtype. Captured tensors in the calibration's stream dtype (that of
            ``hidden_states``, e.g. bf16 from a bf16 pipeline) are cast to it, as a pipeline casts its inputs to its
            transformer's dtype; tensors the pipeline kept in another dtype (float32 timesteps) stay. ``None``: as
            captured (the trainer sets it through :meth:`match_model`).
    """

    def __init__(
        self, calibration: CalibrationSet, batch_size: int, seed: int = 0, dtype: torch.dtype | None = None
    ) -> None:
        if not 1 <= batch_size <= len(calibration):
            raise ConfigError(
                "batch size does not fit the calibration set",
                expected=f"1 <= batch size <= {len(calibration)} (the calibration samples)",
                found=str(batch_size),
                fix="lower the batch size or capture more calibration samples",
            )
        self.calibration = calibration
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(calibration) // batch_size
        self.dtype = dtype
        stream = calibration.batched.get("hidden_states")
        self.stream_dtype = stream.dtype if stream is not None else None

    def match_model(self, model: nn.Module) -> None:
        """Cast batches to ``model``'s parameter dtype from now on (see ``dtype``)."""
        self.dtype = compute_dtype(model)

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of batch ``step``, shape ``(batch_size,)``."""
        epoch, within = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.calibration))
        return order[within * self.batch_size : (within + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, Any]:
        """Keyword arguments of ``model(**batch)`` for batch ``step``."""
        idx = self.indices(step)
        index = torch.from_numpy(idx)
        cal = self.calibration
        out: dict[str, Any] = {k: v.index_select(0, index) for k, v in cal.batched.items()}
        out.update(cal.shared)
        out.update({k: [v[i] for i in idx] for k, v in cal.lists.items()})
        if self.dtype is not None and self.stream_dtype not in (None, self.dtype):
            out = {k: v.to(self.dtype) if _in_dtype(v, self.stream_dtype) else v for k, v in out.items()}
        return out

    def describe(self) -> dict[str, Any]:
        """Source, sizes and content hash of the calibration set."""
        return {
            "source": "calibration",
            "content_hash": self.calibration.content_hash,
            "n_samples": len(self.calibration),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


def _in_dtype(value: Any, dtype: torch.dtype | None) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == dtype
