"""ShapesWorld generation speed (scenes rendered + captioned per second) and ShapesEval scoring speed."""

from __future__ import annotations

import time

import numpy as np

from _results import append
from ppcl.toy.shapes_eval import benchmark_prompts, evaluate, ground_truth_images
from ppcl.toy.world import sample_batch


def _median_rate(fn, n: int, repeats: int = 5) -> float:
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r)
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def main() -> None:
    n = 5000
    gen = _median_rate(lambda r: sample_batch(np.random.default_rng(r), n), n)
    rows, images = ground_truth_images(benchmark_prompts(), seeds=[0, 1, 2])
    ev = _median_rate(lambda r: evaluate(rows, images), len(rows))
    append(
        "ShapesWorld speed",
        f"""
| what | rate (median of 5) |
|---|---|
| scenes generated (render + caption, float tensors) | {gen:,.0f} scenes/s |
| ShapesEval scoring | {ev:,.0f} images/s |
""",
    )


if __name__ == "__main__":
    main()
