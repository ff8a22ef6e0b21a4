"""The toy world as a distillation data source: ShapesWorld batches for the toy teacher (a
:class:`~ppcl.distill.data.DistillData`: every batch a pure function of ``(seed, step)``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppcl.data.sampling import TimestepSampling, batch_generator, check_sampling
from ppcl.toy.teacher import ToyTeacher, img_shapes, patchify
from ppcl.toy.world import sample_batch


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
        gen = batch_generator(self.seed, step, 1)
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
        return {
            "source": "toy.ShapesWorld",
            "batch_size": self.batch_size,
            "seed": self.seed,
            "timestep_sampling": self.timestep_sampling,
            "caption_dropout": self.caption_dropout,
        }
