"""What the sampler sees: paired cond/uncond batches, guided agreement per level and image PSNR at equal seeds.

The sampler integrates the guided velocity ``v_g = v_u + g·(v_c − v_u)``; a pruned model can match the raw velocity
(cosine 0.97) while its guidance direction ``v_c − v_u`` is mostly wrong (cosine 0.22). So the agreement that matters
is measured on *pairs*: a captioned batch and its unconditional twin (same ``x_t`` and ``t``, empty prompt), scored by
the pure functions of :mod:`ppcl.eval.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.errors import ConfigError
from ppcl.eval.metrics import (
    T_BUCKETS,
    guided_agreement,
    guided_velocity,
    psnr,
    stratified_timesteps,
    x0_nmse_by_bucket,
)

#: A conditional batch of transformer kwargs and its unconditional twin.
Pair = tuple[dict[str, Any], dict[str, Any]]

#: Data seed of the default paired toy batches (apart from training seeds and from the unguided held-out 12345).
PAIRED_SEED = 54321
#: Noise seeds of the PSNR images: prompt ``i`` under seed ``s`` starts from noise seeded ``s * 100_000 + i``.
PSNR_SEEDS: tuple[int, ...] = (0, 1)


def uncond_twin(batch: dict[str, Any], empty_embeds: torch.Tensor, empty_mask: torch.Tensor) -> dict[str, Any]:
    """The unconditional twin of ``batch``: the same tensors (``hidden_states`` ``(B, N, C)``, ``timestep`` ``(B,)``,
    ``img_shapes``, ...), with the prompt replaced by the empty prompt's embedding.

    Args:
        batch: conditional transformer kwargs with ``encoder_hidden_states`` ``(B, T, D)`` and
            ``encoder_hidden_states_mask`` ``(B, T)``.
        empty_embeds: the embedding of ``""`` ``(1, T', D)`` (what the sampler's unconditional half uses).
        empty_mask: its mask ``(1, T')``.
    """
    b = batch["hidden_states"].shape[0]
    if empty_embeds.dim() != 3 or empty_embeds.shape[0] != 1 or empty_mask.shape != empty_embeds.shape[:2]:
        raise ConfigError(
            "the empty prompt's embedding has the wrong shape",
            expected="embeds (1, T, D) and mask (1, T)",
            found=f"{tuple(empty_embeds.shape)} and {tuple(empty_mask.shape)}",
            fix='encode [""] once with the pipeline\'s text encoder and pass its outputs',
        )
    twin = dict(batch)
    twin["encoder_hidden_states"] = empty_embeds.expand(b, -1, -1)
    twin["encoder_hidden_states_mask"] = empty_mask.expand(b, -1)
    return twin


def toy_pair(
    teacher: Any, batch_size: int, seed: int, index: int, buckets: Sequence[tuple[float, float]] = T_BUCKETS
) -> Pair:
    """Pair ``index`` of :func:`paired_toy_batches`: ShapesWorld scenes with their captions (no caption dropout),
    ``x_t = (1 − t)·x0 + t·ε`` at times stratified over ``buckets``, and the unconditional twin."""
    from ppcl.toy.teacher import img_shapes, patchify
    from ppcl.toy.world import sample_batch

    rng = np.random.default_rng([seed, index])
    images, captions = sample_batch(rng, batch_size)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    t = stratified_timesteps(batch_size, buckets, gen)
    x0 = patchify(torch.from_numpy(images))
    noise = torch.randn(x0.shape, generator=gen)
    tt = t[:, None, None]
    emb, mask = teacher.encode_prompts(captions)
    cond = {
        "hidden_states": (1 - tt) * x0 + tt * noise,
        "encoder_hidden_states": emb.cpu(),
        "encoder_hidden_states_mask": mask.cpu(),
        "timestep": t,
        "img_shapes": img_shapes(batch_size),
    }
    empty_emb, empty_mask = teacher.encode_prompts([""])
    return cond, uncond_twin(cond, empty_emb.cpu(), empty_mask.cpu())


def paired_toy_batches(
    teacher: Any,
    n_batches: int = 4,
    batch_size: int = 32,
    seed: int = PAIRED_SEED,
    buckets: Sequence[tuple[float, float]] = T_BUCKETS,
) -> list[Pair]:
    """``n_batches`` captioned toy batches and their unconditional twins (a pure function of the arguments).

    Every batch has ``batch_size // len(buckets)`` (or one more) samples in every time bucket, so the x0-prediction
    NMSE of each bucket is measured on samples of every batch.

    Args:
        teacher: a :class:`~ppcl.toy.teacher.ToyTeacher` (only its text encoder is used).
        n_batches: pairs to draw.
        batch_size: samples per batch, at least ``len(buckets)``.
        seed: data seed.
        buckets: time buckets the timesteps are stratified over.
    """
    if n_batches < 1:
        raise ConfigError("no paired batches requested", expected=">= 1 batches", found=str(n_batches))
    return [toy_pair(teacher, batch_size, seed, i, buckets) for i in range(n_batches)]


@torch.no_grad()
def predict_pairs(model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's conditional and unconditional predictions on every pair, each ``(ΣB, N, C)``."""
    cond = torch.cat([model(**c, return_dict=False)[0] for c, _ in pairs])
    uncond = torch.cat([model(**u, return_dict=False)[0] for _, u in pairs])
    return cond, uncond


def pair_inputs(pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` ``(ΣB, N, C)`` and ``t`` ``(ΣB,)`` of every pair (shared by both halves)."""
    return (torch.cat([c["hidden_states"] for c, _ in pairs]), torch.cat([c["timestep"].reshape(-1) for c, _ in pairs]))


def guided_row(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    guidance: float,
    buckets: Sequence[tuple[float, float]] = T_BUCKETS,
) -> dict[str, Any]:
    """The guided metrics of one level: :func:`~ppcl.eval.metrics.guided_agreement` keys plus ``x0_nmse``
    ``{bucket label: NMSE}`` of the x0 prediction from the *guided* velocity (what each sampler step heads for).

    ``student`` and ``teacher`` are ``(v_cond, v_uncond)`` each ``(B, N, C)``; ``x_t`` ``(B, N, C)``, ``t`` ``(B,)``.
    """
    row: dict[str, Any] = guided_agreement(*student, *teacher, guidance)
    v_s, v_t = guided_velocity(*student, guidance), guided_velocity(*teacher, guidance)
    row["x0_nmse"] = x0_nmse_by_bucket(x_t.to(v_t.dtype), t.to(v_t.dtype), v_s, v_t, buckets)
    return row


def teacher_guided_row(x0_labels: Sequence[str]) -> dict[str, Any]:
    """The teacher's own row: zero NMSE, cosine 1 (exact, not measured against itself)."""
    return {
        "guided_nmse": 0.0,
        "guided_cosine": 1.0,
        "direction_nmse": 0.0,
        "direction_cosine": 1.0,
        "cond_nmse": 0.0,
        "uncond_nmse": 0.0,
        "x0_nmse": dict.fromkeys(x0_labels, 0.0),
    }


def psnr_prompts(per_category: int) -> list[str]:
    """``per_category`` ShapesEval benchmark prompts of each of the four categories (fixed, seeded)."""
    from ppcl.toy.shapes_eval import benchmark_prompts

    return [p.text for p in benchmark_prompts(per_category)]


def psnr_images(
    teacher: Any,
    transformer: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int] = PSNR_SEEDS,
    guidance: float = 4.0,
) -> np.ndarray:
    """uint8 images ``(len(seeds) * len(prompts), 32, 32, 3)`` of ``transformer`` (at its active level) with the toy
    sampler's defaults and ``guidance``; the noise depends only on (seed, prompt index), so models compare pixelwise."""
    from ppcl.toy.sampler import SamplerConfig, sample

    rows = [p for _ in seeds for p in prompts]
    noise = [s * 100_000 + i for s in seeds for i in range(len(prompts))]
    return sample(teacher, rows, noise, SamplerConfig(guidance=guidance), transformer=transformer, show_progress=False)


def image_psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean PSNR (dB) of uint8 ``images`` ``(M, H, W, 3)`` to the teacher's ``reference`` at equal seeds."""
    if images.shape != reference.shape:
        raise ConfigError(
            "PSNR needs one image per teacher image",
            expected=f"images {reference.shape}",
            found=str(images.shape),
            fix="sample both with the same prompts and seeds",
        )
    return round(psnr(images, reference), 3)
