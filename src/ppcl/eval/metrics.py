"""Quality metrics of a pruned model against its teacher (pure tensor maths, no model code): velocity agreement,
guided (classifier-free guidance) agreement, x0-prediction NMSE per time bucket, image PSNR and R."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ppcl.errors import ConfigError

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


def relative_drop(scores: Mapping[str, float], teacher: Mapping[str, float], tasks: Sequence[str] = TASKS) -> float:
    """R: the mean relative drop of the task scores, ``mean_k (teacher_k − scores_k) / teacher_k`` (paper's R).

    Tasks where the teacher scores 0 are skipped (a relative drop is undefined there). Negative R = better than the
    teacher on average.
    """
    drops = [(teacher[k] - scores[k]) / teacher[k] for k in tasks if teacher.get(k)]
    return float(np.mean(drops)) if drops else float("nan")


# ------------------------------------------------------------------------------------- guided (CFG) agreement
#: Time buckets of the x0-prediction NMSE: [0, 0.25), [0.25, 0.5), [0.5, 0.75), [0.75, 1] (the last one closed).
T_BUCKETS: tuple[tuple[float, float], ...] = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def nmse(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Normalised MSE ``Σ‖s − t‖² / Σ‖t‖²`` pooled over every sample of ``(B, ...)`` tensors.

    0 = identical; 1 = as far as predicting zero. Pooling (not a mean of per-sample ratios) keeps samples whose
    reference is nearly zero from dominating.
    """
    s, t = student.detach().double(), teacher.detach().double()
    return float(((s - t) ** 2).sum() / (t**2).sum().clamp_min(1e-30))


def mean_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over the batch of the per-sample cosine of flattened ``(B, ...)`` tensors (a zero vector gives 0)."""
    s, t = student.detach().double().flatten(1), teacher.detach().double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(s, t, dim=1).mean())


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free-guided velocity ``v_g = v_u + g·(v_c − v_u)``, what the sampler integrates; ``(B, N, C)``."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guided_agreement(
    student_cond: torch.Tensor,
    student_uncond: torch.Tensor,
    teacher_cond: torch.Tensor,
    teacher_uncond: torch.Tensor,
    guidance: float,
) -> dict[str, float]:
    """Agreement of a student with its teacher on paired cond/uncond predictions, all ``(B, N, C)`` at equal x_t, t.

    With ``v_g = v_u + g·(v_c − v_u)`` and the guidance direction ``d = v_c − v_u`` (superscript s = student,
    t = teacher; every NMSE is :func:`nmse`, pooled over the batch; every cosine is :func:`mean_cosine`):

    * ``guided_nmse``      = Σ‖v_g^s − v_g^t‖² / Σ‖v_g^t‖²   (the velocity the sampler actually uses)
    * ``guided_cosine``    = mean_b cos(v_g^s[b], v_g^t[b])
    * ``direction_nmse``   = Σ‖d^s − d^t‖² / Σ‖d^t‖²        (1 = the student ignores the prompt: d^s = 0)
    * ``direction_cosine`` = mean_b cos(d^s[b], d^t[b])
    * ``cond_nmse``        = Σ‖v_c^s − v_c^t‖² / Σ‖v_c^t‖²
    * ``uncond_nmse``      = Σ‖v_u^s − v_u^t‖² / Σ‖v_u^t‖²
    """
    g_s = guided_velocity(student_cond, student_uncond, guidance)
    g_t = guided_velocity(teacher_cond, teacher_uncond, guidance)
    d_s, d_t = student_cond - student_uncond, teacher_cond - teacher_uncond
    return {
        "guided_nmse": nmse(g_s, g_t),
        "guided_cosine": mean_cosine(g_s, g_t),
        "direction_nmse": nmse(d_s, d_t),
        "direction_cosine": mean_cosine(d_s, d_t),
        "cond_nmse": nmse(student_cond, teacher_cond),
        "uncond_nmse": nmse(student_uncond, teacher_uncond),
    }


def check_buckets(buckets: Sequence[tuple[float, float]]) -> None:
    """Raise :class:`~ppcl.errors.ConfigError` unless ``buckets`` are non-empty, contiguous and increasing in [0, 1]."""
    edges_ok = bool(buckets) and all(lo < hi for lo, hi in buckets)
    contiguous = all(a[1] == b[0] for a, b in zip(buckets[:-1], buckets[1:], strict=False))
    if not (edges_ok and contiguous and buckets[0][0] >= 0.0 and buckets[-1][1] <= 1.0):
        raise ConfigError(
            "time buckets must tile a part of [0, 1] in order",
            expected="contiguous (lo, hi) pairs with 0 <= lo < hi <= 1, e.g. ((0, 0.5), (0.5, 1))",
            found=repr(tuple(buckets)),
        )


def bucket_label(bucket: tuple[float, float]) -> str:
    """JSON key of a time bucket, e.g. ``"0.25-0.50"``."""
    return f"{bucket[0]:.2f}-{bucket[1]:.2f}"


def bucket_index(t: torch.Tensor, buckets: Sequence[tuple[float, float]]) -> torch.Tensor:
    """Bucket of every time ``t`` ``(B,)`` as int64 ``(B,)``; ``lo <= t < hi``, the last bucket includes its ``hi``;
    -1 for a time in no bucket."""
    index = torch.full(t.shape, -1, dtype=torch.long)
    for k, (lo, hi) in enumerate(buckets):
        inside = (t >= lo) & ((t <= hi) if k == len(buckets) - 1 else (t < hi))
        index[inside] = k
    return index


def stratified_timesteps(n: int, buckets: Sequence[tuple[float, float]], generator: torch.Generator) -> torch.Tensor:
    """``n`` times ``(n,)``, as even a share per bucket as ``n`` allows (the first ``n mod K`` buckets get one more),
    uniform inside each bucket, so every one of the ``K`` buckets has samples when ``n >= K``."""
    check_buckets(buckets)
    if n < len(buckets):
        raise ConfigError(
            "too few samples to cover every time bucket",
            expected=f">= {len(buckets)} samples per batch (one per bucket)",
            found=str(n),
            fix="raise the batch size or use fewer buckets",
        )
    k = len(buckets)
    parts = []
    for i, (lo, hi) in enumerate(buckets):
        count = n // k + (1 if i < n % k else 0)
        parts.append(lo + (hi - lo) * torch.rand(count, generator=generator))
    return torch.cat(parts)


def x0_prediction(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The clean-sample prediction ``x̂0 = x_t − t·v`` ``(B, N, C)`` under the flow-matching convention
    ``x_t = (1 − t)·x0 + t·ε``, ``v = ε − x0`` (toy teacher, Qwen-Image), for times ``t`` ``(B,)`` in [0, 1]."""
    return x_t - t.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1))) * v


def x0_nmse_by_bucket(
    x_t: torch.Tensor,
    t: torch.Tensor,
    v_student: torch.Tensor,
    v_teacher: torch.Tensor,
    buckets: Sequence[tuple[float, float]] = T_BUCKETS,
) -> dict[str, float]:
    """x0-prediction NMSE per time bucket: ``Σ_{b ∈ bucket} ‖x̂0^s[b] − x̂0^t[b]‖² / Σ_{b ∈ bucket} ‖x̂0^t[b]‖²``.

    ``x̂0 = x_t − t·v`` (:func:`x0_prediction`) from ``x_t`` ``(B, N, C)``, ``t`` ``(B,)`` in [0, 1] and velocities
    ``(B, N, C)`` (pass guided velocities to measure what the sampler sees). At large ``t`` a small velocity error
    is a large error of the image the step heads for, which the velocity NMSE hides. Keys are :func:`bucket_label`;
    a bucket without samples is NaN.
    """
    check_buckets(buckets)
    if float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ConfigError(
            "x0 prediction needs times in [0, 1]",
            expected="flow-matching sigmas t in [0, 1] (x_t = (1 - t) x0 + t noise)",
            found=f"timesteps in [{float(t.min()):.3g}, {float(t.max()):.3g}]",
            fix="pass batches whose timestep is sigma, not sigma x 1000",
        )
    x0_s, x0_t = x0_prediction(x_t, t, v_student), x0_prediction(x_t, t, v_teacher)
    index = bucket_index(t, buckets)
    out = {}
    for k, bucket in enumerate(buckets):
        inside = index == k
        out[bucket_label(bucket)] = nmse(x0_s[inside], x0_t[inside]) if bool(inside.any()) else float("nan")
    return out
