"""Distillation batches from a latent cache (:mod:`ppcl.data.latent_cache`): noised latents at scheduler-shaped σ.

Per micro-batch index ``step`` (which already folds in the process rank, see :mod:`ppcl.distill.data`): one bucket is
drawn with probability proportional to its sample count, then ``batch_size`` samples of it, all from
``np.random.default_rng([seed, step])``; times and noise come from a torch generator seeded by ``(seed, step)``.

``x_t = (1 − σ)·x0 + σ·ε`` with ``σ = shift(u)``, ``u ~ U(0, 1)`` (or ``sigmoid(N(0, 1))``), where ``shift`` is the
map the pipeline's ``FlowMatchEulerDiscreteScheduler`` applies to its sigmas: the fixed shift
``s·u / (1 + (s − 1)·u)``, or with ``use_dynamic_shifting`` the resolution-dependent time shift with
``mu`` from the image token count and the scheduler config, as the family's pipeline computes it for that bucket
(:meth:`~ppcl.arch.latents.LatentFormat.shift_mu`).
(``shift_terminal`` stretches a discrete inference schedule and has no continuous counterpart; it is not applied.)

The forward keyword arguments are built per architecture exactly as the pipelines call their transformer:
FLUX.1 packed latents + ``img_ids`` / ``txt_ids`` + ``pooled_projections`` (+ ``guidance`` when the model embeds it),
timestep σ; SD3 unpacked latents + ``pooled_projections``, timestep ``σ·1000``; Qwen-Image packed latents +
``encoder_hidden_states_mask`` + ``img_shapes``, timestep σ.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppcl.arch import spec_by_name
from ppcl.data.latent_cache import TRANSFORMER_KEYS, LatentCache
from ppcl.data.sampling import TimestepSampling, batch_generator, check_sampling
from ppcl.errors import ArtefactError


def shift_sigmas(
    u: torch.Tensor, scheduler_config: dict[str, Any], image_seq_len: int, arch: str = "flux"
) -> torch.Tensor:
    """Map uniform times ``u`` in [0, 1] to σ the way the scheduler shifts its sigmas for ``image_seq_len`` tokens."""
    c = scheduler_config
    if c.get("use_dynamic_shifting"):
        mu = spec_by_name(arch).latent_format().shift_mu(image_seq_len, c)
        odds = 1 / u.clamp_min(1e-12) - 1  # sigma = 1.0 in the scheduler's time_shift
        scale = mu if c.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
        return scale / (scale + odds)
    shift = float(c.get("shift", 1.0))
    return shift * u / (1 + (shift - 1) * u)


def read_scheduler_config(pipeline: str | os.PathLike[str]) -> dict[str, Any]:
    """``PIPELINE/scheduler/scheduler_config.json`` as a dict."""
    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ArtefactError(
            "pipeline has no scheduler config",
            expected=str(path),
            found="no such file",
            fix="pass the pipeline folder written by `save_pretrained`",
        )
    return json.loads(path.read_text())


class LatentCacheData:
    """A :class:`~ppcl.distill.data.DistillData` over a :class:`~ppcl.data.latent_cache.LatentCache`.

    Args:
        cache: the cache (or its folder).
        batch_size: samples per batch (drawn with replacement when a bucket holds fewer).
        seed: data seed.
        timestep_sampling: ``"uniform"`` or ``"logit_normal"`` for ``u`` before the scheduler shift.
        caption_dropout: probability of replacing a sample's prompt embedding by the cached embedding of ``""``.
        scheduler_config: the pipeline's scheduler config (default: the one recorded in the cache).
        guidance: FLUX.1 guidance value for models with ``guidance_embeds`` (the pipeline's default 3.5).
        dtype: dtype of the floating tensors handed out (the model's).
    """

    def __init__(
        self,
        cache: LatentCache | str | os.PathLike[str],
        batch_size: int,
        seed: int = 0,
        timestep_sampling: TimestepSampling = "uniform",
        caption_dropout: float = 0.0,
        scheduler_config: dict[str, Any] | None = None,
        guidance: float = 3.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        check_sampling(batch_size, timestep_sampling, caption_dropout)
        if len(self.cache) == 0:
            raise ArtefactError(
                "latent cache is empty", expected="at least one sample", found="0", fix="re-run `ppcl cache` with data"
            )
        self.batch_size, self.seed, self.timestep_sampling = batch_size, seed, timestep_sampling
        self.caption_dropout, self.guidance, self.dtype = caption_dropout, guidance, dtype
        self.scheduler_config = dict(scheduler_config if scheduler_config is not None else self.cache.scheduler_config)
        self.arch = self.cache.arch
        self.transformer = self.cache.manifest["pipeline"]["transformer"]
        counts = np.asarray(self.cache.counts, dtype=np.float64)
        self._p = counts / counts.sum()

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise if ``model`` cannot take this cache's inputs (other arch, channels or text width)."""
        from ppcl.arch import get_spec

        name = get_spec(model).name
        found = {k: model.config.get(k) for k in TRANSFORMER_KEYS}
        found = {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()}
        if name != self.arch or found != self.transformer:
            raise ArtefactError(
                "latent cache was built for another model",
                expected=f"{self.arch} {self.transformer}",
                found=f"{name} {found}",
                fix="run `ppcl cache` with this model's pipeline",
            )

    def sigmas(self, step: int, bucket: int) -> torch.Tensor:
        """σ of batch ``step`` for ``bucket`` (shape ``(batch_size,)``)."""
        gen = batch_generator(self.seed, step, 1)
        if self.timestep_sampling == "uniform":
            u = torch.rand(self.batch_size, generator=gen)
        else:
            u = torch.sigmoid(torch.randn(self.batch_size, generator=gen))
        return shift_sigmas(u, self.scheduler_config, self.image_tokens(bucket), self.arch)

    def image_tokens(self, bucket: int) -> int:
        """Transformer image tokens of a bucket (what the pipelines compute the time shift from)."""
        h, w = self.cache.manifest["latent_shapes"][str(bucket)][1:]
        patch = spec_by_name(self.arch).latent_format().token_patch(self.transformer)
        return (h // patch) * (w // patch)

    def batch(self, step: int) -> dict[str, Any]:
        """Keyword arguments of ``transformer(**batch)`` for micro-batch ``step``."""
        rng = np.random.default_rng([self.seed, step])
        bucket = int(rng.choice(len(self._p), p=self._p))
        count = self.cache.counts[bucket]
        rows = rng.choice(count, size=self.batch_size, replace=count < self.batch_size)
        drop = rng.random(self.batch_size) < self.caption_dropout
        samples = [self.cache.read(bucket, [r]) for r in rows]
        empty = {k: v[0] for k, v in self.cache.empty.items()}
        samples = [
            {**({k: v[0] for k, v in s.items() if k != "latents"} if not d else empty), "latents": s["latents"][0]}
            for s, d in zip(samples, drop, strict=True)
        ]
        data = self.cache.stack(samples)
        x0 = data["latents"]
        sigma = self.sigmas(step, bucket)
        noise = torch.randn(x0.shape, generator=batch_generator(self.seed, step, 2))
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        return self._kwargs(x_t, sigma, data)

    def _kwargs(self, x_t: torch.Tensor, sigma: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The family's transformer inputs (:meth:`~ppcl.arch.latents.LatentFormat.model_inputs`), + ``guidance``
        when the model embeds it."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.dtype)

        out = spec_by_name(self.arch).latent_format().model_inputs(x_t, sigma, data, self.transformer, cast)
        if self.transformer.get("guidance_embeds"):
            out["guidance"] = torch.full((x_t.shape[0],), float(self.guidance), dtype=torch.float32)
        return out

    def describe(self) -> dict[str, Any]:
        """Source, cache identity and sampling settings."""
        m = self.cache.manifest
        return {
            "source": "latent_cache",
            "path": str(self.cache.folder),
            "arch": self.arch,
            "pipeline_hash": m["pipeline"]["hash"],
            "n_samples": len(self.cache),
            "buckets": m["buckets"],
            "counts": m["counts"],
            "batch_size": self.batch_size,
            "seed": self.seed,
            "timestep_sampling": self.timestep_sampling,
            "caption_dropout": self.caption_dropout,
            "scheduler_shift": {
                k: self.scheduler_config.get(k)
                for k in (
                    "shift",
                    "use_dynamic_shifting",
                    "base_shift",
                    "max_shift",
                    "base_image_seq_len",
                    "max_image_seq_len",
                    "time_shift_type",
                )
            },
        }
