"""Where distillation batches come from.

A :class:`DistillData` hands out the transformer's forward keyword arguments for training step ``step``. Every
batch is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would
have seen and the trainer only needs to remember the step number.

The index a source receives is the trainer's micro-batch index ``(step * accumulation + micro) * P + rank`` for ``P``
processes, so the data of a multi-process run is a pure function of ``(seed, step, rank)`` and the processes never
draw the same batch (see :mod:`ppcl.distill.trainer`).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from ppcl.data.calibration import CalibrationSet
from ppcl.errors import ConfigError
from ppcl.toy.teacher import ToyTeacher, img_shapes, patchify
from ppcl.toy.world import sample_batch

TimestepSampling = Literal["uniform", "logit_normal"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal")


@runtime_checkable
class DistillData(Protocol):
    """A deterministic source of transformer inputs."""

    def batch(self, step: int) -> dict[str, Any]:
        """Keyword arguments of ``transformer(**batch)`` for micro-batch ``step`` (same ``step`` → same batch)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in the add-on's provenance."""
        ...


def _generator(seed: int, step: int, salt: int) -> torch.Generator:
    # One independent torch stream per (seed, step, purpose), derived through numpy's SeedSequence hashing.
    value = int(np.random.default_rng([seed, step, salt]).integers(0, 2**62))
    return torch.Generator().manual_seed(value)


def check_sampling(batch_size: int, timestep_sampling: str, caption_dropout: float) -> None:
    """Raise :class:`ConfigError` for settings no data source can honour (shared by the sources)."""
    if batch_size < 1:
        raise ConfigError("batch size must be positive", expected=">= 1", found=str(batch_size))
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError("unknown timestep sampling", expected=f"one of {TIMESTEP_SAMPLINGS}",
                          found=repr(timestep_sampling))
    if not 0.0 <= caption_dropout <= 1.0:
        raise ConfigError("caption dropout must be a probability", expected="0 <= p <= 1",
                          found=str(caption_dropout))


class ToyDistillData:
    """ShapesWorld batches for the toy teacher: noisy image tokens ``x_t`` at random times with encoded captions.

    ``x_t = (1 − t)·x0 + t·ε`` with ``x0`` the patchified image ``(B, 64, 48)`` and ``t`` passed to the transformer as
    its timestep (the toy teacher, like Qwen-Image, takes σ in [0, 1]).

    Args:
        teacher: the toy teacher; only its frozen text encoder and tokenizer are used here.
        batch_size: samples per batch.
        seed: data seed; batch ``step`` draws scenes from ``np.random.default_rng([seed, step])``.
        timestep_sampling: ``"uniform"`` (t ~ U(0, 1), the authors' release in effect) or ``"logit_normal"``
            (t = sigmoid(N(0, 1)), concentrating on mid-trajectory times).
        caption_dropout: probability of replacing a caption by ``""``, so the unconditional branch used by
            classifier-free guidance is distilled too.
    """

    def __init__(
        self,
        teacher: ToyTeacher,
        batch_size: int,
        seed: int = 0,
        timestep_sampling: TimestepSampling = "uniform",
        caption_dropout: float = 0.1,
    ) -> None:
        check_sampling(batch_size, timestep_sampling, caption_dropout)
        self.teacher = teacher
        self.batch_size = batch_size
        self.seed = seed
        self.timestep_sampling = timestep_sampling
        self.caption_dropout = caption_dropout
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch(self, step: int) -> dict[str, Any]:
        """Inputs of ``teacher.transformer``: ``hidden_states (B, 64, 48)``, ``encoder_hidden_states (B, T, 64)``,
        ``encoder_hidden_states_mask (B, T)``, ``timestep (B,)`` and ``img_shapes``."""
        rng = np.random.default_rng([self.seed, step])
        images, captions = sample_batch(rng, self.batch_size)
        drop = rng.random(self.batch_size) < self.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        gen = _generator(self.seed, step, 1)
        if self.timestep_sampling == "uniform":
            t = torch.rand(self.batch_size, generator=gen)
        else:
            t = torch.sigmoid(torch.randn(self.batch_size, generator=gen))
        x0 = patchify(torch.from_numpy(images))
        noise = torch.randn(x0.shape, generator=gen)
        tt = t[:, None, None]
        emb, mask = self.teacher.encode_prompts(captions)
        return {
            "hidden_states": (1 - tt) * x0 + tt * noise,
            "encoder_hidden_states": emb.cpu(),
            "encoder_hidden_states_mask": mask.cpu(),
            "timestep": t,
            "img_shapes": img_shapes(self.batch_size),
        }

    def unconditional(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's unconditional twin for classifier-free guidance: the same ``x_t``, timestep and image shapes
        with every caption replaced by ``""`` (what the toy sampler's unconditional half sees)."""
        b = batch["hidden_states"].shape[0]
        if self._empty is None or self._empty[0].shape[0] != b:
            self._empty = self.teacher.encode_prompts([""] * b)
        emb, mask = self._empty
        device = batch["hidden_states"].device
        return {**batch, "encoder_hidden_states": emb.to(device), "encoder_hidden_states_mask": mask.to(device)}

    def describe(self) -> dict[str, Any]:
        """Source, sizes and sampling settings."""
        return {"source": "toy.ShapesWorld", "batch_size": self.batch_size, "seed": self.seed,
                "timestep_sampling": self.timestep_sampling, "caption_dropout": self.caption_dropout}


class CalibrationData:
    """Cycles through a :class:`~ppcl.data.calibration.CalibrationSet` in seeded-shuffled order.

    Epoch ``e`` visits the samples in the order ``default_rng([seed, e]).permutation(N)``, cut into
    ``N // batch_size`` full batches (the remainder differs from epoch to epoch, so every sample is still used).

    Args:
        calibration: captured transformer inputs.
        batch_size: samples per batch (at most the number of samples).
        seed: shuffle seed.
    """

    def __init__(self, calibration: CalibrationSet, batch_size: int, seed: int = 0) -> None:
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

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of batch ``step``, shape ``(batch_size,)``."""
        epoch, within = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.calibration))
        return order[within * self.batch_size:(within + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, Any]:
        """Keyword arguments of ``model(**batch)`` for batch ``step``."""
        idx = self.indices(step)
        index = torch.from_numpy(idx)
        cal = self.calibration
        out: dict[str, Any] = {k: v.index_select(0, index) for k, v in cal.batched.items()}
        out.update(cal.shared)
        out.update({k: [v[i] for i in idx] for k, v in cal.lists.items()})
        return out

    def describe(self) -> dict[str, Any]:
        """Source, sizes and content hash of the calibration set."""
        return {"source": "calibration", "content_hash": self.calibration.content_hash, "n_samples":
                len(self.calibration), "batch_size": self.batch_size, "seed": self.seed}
