"""Per-step latency of several model variants, measured interleaved in one process.

Interleaving (A, B, C, A, B, C, ...) spreads slow drifts of the machine (thermal, other load) evenly over the
variants, so their ratios are fair even when absolute times wander. The median over repeats is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_latency(
    variants: Mapping[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable ``repeats`` times, interleaved; returns {name: {median_ms, min_ms, iqr_ms}}.

    Each callable should run exactly one denoising step (one transformer forward) and may switch the model's level
    first (``set_level`` is O(1), so the switch does not distort the timing).
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                variants[name]()
        for r in range(repeats):
            # Rotate the order so no variant always runs right after the same one.
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                variants[name]()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, values in times.items():
        arr = np.array(values)
        out[name] = {
            "median_ms": float(np.median(arr)),
            "min_ms": float(arr.min()),
            "iqr_ms": float(np.percentile(arr, 75) - np.percentile(arr, 25)),
        }
    return out


def ratios(latency: Mapping[str, Mapping[str, float]], reference: str) -> dict[str, float]:
    """Median latency of each variant divided by the reference's (teacher = 1.0)."""
    base = latency[reference]["median_ms"]
    return {name: stats["median_ms"] / base for name, stats in latency.items()}
