"""Euler flow-matching sampler with classifier-free guidance for the toy world.

Integrates dx/dt = v(x, t) from t = 1 (pure noise) to t = 0 (image) on a uniform grid. The conditional and
unconditional predictions share one batched forward pass per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ppcl.logging import progress
from ppcl.toy.teacher import ToyTeacher, unpatchify, velocity
from ppcl.toy.world import to_uint8


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings: Euler steps, guidance scale and batch size."""

    steps: int = 20
    guidance: float = 4.0
    batch_size: int = 64


def initial_noise(n: int, seeds: list[int] | int) -> torch.Tensor:
    """Noise tokens ``(n, 64, 48)``; each sample's noise depends only on its own seed, not on batch composition."""
    seeds = [seeds + i for i in range(n)] if isinstance(seeds, int) else seeds
    return torch.stack([torch.randn(64, 48, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    teacher: ToyTeacher,
    prompts: list[str],
    seeds: list[int] | int = 0,
    config: SamplerConfig = SamplerConfig(),
    transformer: torch.nn.Module | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Generate one image per prompt; returns uint8 ``(N, 32, 32, 3)``.

    ``transformer`` defaults to the teacher's own; pass a pruned model to sample from it with the same text encoder.
    ``on_step(i)`` is called before Euler step ``i`` of every batch (calibration capture uses it).
    """
    model = transformer if transformer is not None else teacher.transformer
    noise = initial_noise(len(prompts), seeds)
    uncond_emb, uncond_mask = teacher.encode_prompts([""])
    out = []
    starts = range(0, len(prompts), config.batch_size)
    for start in progress(starts, desc="sample", total=len(starts), disable=None if show_progress else True):
        chunk = prompts[start : start + config.batch_size]
        x = noise[start : start + len(chunk)].clone()
        emb, mask = teacher.encode_prompts(chunk)
        emb = torch.cat([emb, uncond_emb.expand(len(chunk), -1, -1)])
        mask = torch.cat([mask, uncond_mask.expand(len(chunk), -1)])
        out.append(_integrate(model, x, emb, mask, config, on_step))
    images = unpatchify(torch.cat(out)).float().numpy()
    return to_uint8(images)


def _integrate(
    model: torch.nn.Module,
    x: torch.Tensor,
    emb: torch.Tensor,
    mask: torch.Tensor,
    config: SamplerConfig,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Euler steps from t=1 to t=0 for noise ``x`` ``(B, 64, 48)`` with [cond; uncond] prompts ``(2B, T, D)``."""
    dtype = next(model.parameters()).dtype
    x, emb = x.to(dtype), emb.to(dtype)
    grid = torch.linspace(1.0, 0.0, config.steps + 1)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=False)):
        if on_step is not None:
            on_step(i)
        tt = torch.full((2 * x.shape[0],), float(t), dtype=dtype)
        v_cond, v_uncond = velocity(model, torch.cat([x, x]), tt, emb, mask).chunk(2)
        v = v_uncond + config.guidance * (v_cond - v_uncond)
        x = x + (t_next - t) * v
    return x
