"""Scoring a toy model on the ShapesEval benchmark (teacher or any pruned variant).

Every score dict holds the robust scorer's scores at the top level (``overall``, ``single``, ``two_objects``,
``position``, ``color``, ``n_images``; what R and the reports read) and the strict scorer's dict of the same images
under ``"strict"``: the images are sampled once and scored twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppcl.toy.sampler import SamplerConfig, sample
from ppcl.toy.shapes_eval import Prompt, benchmark_prompts, evaluate, ground_truth_images
from ppcl.toy.teacher import ToyTeacher

#: Benchmark defaults: 60 prompts per category (240 in all) x 2 seeds = 480 images.
N_PER_CATEGORY = 60
SEEDS = (0, 1)


def score_images(rows: list[Prompt], images: np.ndarray) -> dict[str, Any]:
    """Robust ShapesEval of ``images`` (one per prompt of ``rows``) plus ``"strict"``: the strict scorer's dict."""
    result: dict[str, Any] = dict(evaluate(rows, images, mode="robust"))
    result["strict"] = evaluate(rows, images, mode="strict")
    return result


def score_ground_truth(n_per_category: int = N_PER_CATEGORY, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """ShapesEval of rendered ground truth for the benchmark prompts (1.0 by construction, in both modes)."""
    rows, images = ground_truth_images(benchmark_prompts(n_per_category), list(seeds))
    return score_images(rows, images)


def sample_benchmark(
    teacher: ToyTeacher,
    transformer: torch.nn.Module | None = None,
    n_per_category: int = N_PER_CATEGORY,
    seeds: tuple[int, ...] = SEEDS,
    sampler: SamplerConfig = SamplerConfig(),
) -> tuple[list[Prompt], np.ndarray]:
    """The benchmark rows (every prompt once per seed) and uint8 images ``(len(rows), 32, 32, 3)`` of
    ``transformer`` (default: the teacher) at its active level.

    The noise of (prompt i, seed s) is seeded by ``s * 100_000 + i``, so teacher and pruned models are compared on
    exactly the same starting noise (and their images pixel by pixel).
    """
    prompts = benchmark_prompts(n_per_category)
    rows = [p for _ in seeds for p in prompts]
    noise_seeds = [s * 100_000 + i for s in seeds for i in range(len(prompts))]
    return rows, sample(teacher, [p.text for p in rows], noise_seeds, sampler, transformer=transformer)


def score_model(
    teacher: ToyTeacher,
    transformer: torch.nn.Module | None = None,
    n_per_category: int = N_PER_CATEGORY,
    seeds: tuple[int, ...] = SEEDS,
    sampler: SamplerConfig = SamplerConfig(),
) -> dict[str, Any]:
    """ShapesEval of images sampled from ``transformer`` (default: the teacher) for every prompt and seed
    (:func:`sample_benchmark`)."""
    return score_images(*sample_benchmark(teacher, transformer, n_per_category, seeds, sampler))
