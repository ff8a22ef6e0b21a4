"""Seeded draws shared by the training data sources (:mod:`ppcl.distill.data`, :mod:`ppcl.distill.latent_data`,
:mod:`ppcl.toy.distill_data`): one independent torch stream per (seed, step, purpose), and the settings every source
checks the same way."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ppcl.errors import ConfigError

TimestepSampling = Literal["uniform", "logit_normal"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal")


def batch_generator(seed: int, step: int, salt: int) -> torch.Generator:
    # One independent torch stream per (seed, step, purpose), derived through numpy's SeedSequence hashing.
    value = int(np.random.default_rng([seed, step, salt]).integers(0, 2**62))
    return torch.Generator().manual_seed(value)


def check_sampling(batch_size: int, timestep_sampling: str, caption_dropout: float) -> None:
    """Raise :class:`ConfigError` for settings no data source can honour (shared by the sources)."""
    if batch_size < 1:
        raise ConfigError("batch size must be positive", expected=">= 1", found=str(batch_size))
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(
            "unknown timestep sampling", expected=f"one of {TIMESTEP_SAMPLINGS}", found=repr(timestep_sampling)
        )
    if not 0.0 <= caption_dropout <= 1.0:
        raise ConfigError("caption dropout must be a probability", expected="0 <= p <= 1", found=str(caption_dropout))
