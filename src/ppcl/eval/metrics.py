"""Quality metrics of a pruned model against its teacher: velocity agreement, image PSNR and R."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

TASKS: tuple[str, ...] = ("single", "two_objects", "position", "color")


def velocity_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cosine and normalised MSE between predictions ``(B, N, C)``, over all samples.

    ``cosine`` is the mean per-sample cosine of the flattened predictions; ``nmse`` = ‖s − t‖² / ‖t‖² summed over
    the batch (0 = identical, 1 = as far as predicting zero).
    """
    s, t = student.detach().double().flatten(1), teacher.detach().double().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(s, t, dim=1).mean()
    nmse = ((s - t) ** 2).sum() / (t**2).sum().clamp_min(1e-30)
    return {"cosine": float(cosine), "nmse": float(nmse)}


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR (dB) of uint8 ``images`` ``(N, H, W, 3)`` against ``reference`` at equal seeds (mean over images)."""
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = np.mean(diff**2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def relative_drop(scores: Mapping[str, float], teacher: Mapping[str, float],
                  tasks: Sequence[str] = TASKS) -> float:
    """R: the mean relative drop of the task scores, ``mean_k (teacher_k − scores_k) / teacher_k`` (paper's R).

    Tasks where the teacher scores 0 are skipped (a relative drop is undefined there). Negative R = better than the
    teacher on average.
    """
    drops = [(teacher[k] - scores[k]) / teacher[k] for k in tasks if teacher.get(k)]
    return float(np.mean(drops)) if drops else float("nan")
