"""ShapesEval: a rule-based, GenEval-like prompt-adherence score for ShapesWorld images.

Objects are found by one of two rule-based detectors (no learned model is involved), in
:mod:`ppcl.toy.shapes_detect`: ``robust`` (the default; tolerates the sub-pixel boundary noise of generated images)
and ``strict`` (the original scorer, kept bit-identical; a cliff at object borders).

Benchmark: a fixed, seeded prompt set in four categories, like GenEval's tasks:

* ``single``      "a red circle"                         one object, right shape and colour, nothing else
* ``two_objects`` "a red circle and a blue square"       both objects with right attributes, nothing else
* ``position``    "a red circle left of a blue square"   both objects present (as above) and the relation holds
* ``color``       "a green triangle" (colour prompts)    one object of the right colour, nothing else (shape ignored)

``overall`` is the mean of the four category scores, as GenEval averages its tasks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ppcl.toy.shapes_detect import (  # re-exported: the detectors were part of this module
    CLUTTER,
    MODES,
    Detection,
    Mode,
    classify_shape,
    detect,
    detect_all,
    drawn_template,
    shape_template,
)
from ppcl.toy.world import COLORS, RELATIONS, SHAPES, Scene, render, scene_for

__all__ = [
    "CATEGORIES",
    "CLUTTER",
    "MODES",
    "Detection",
    "Mode",
    "Prompt",
    "benchmark_prompts",
    "classify_shape",
    "detect",
    "detect_all",
    "drawn_template",
    "evaluate",
    "ground_truth_images",
    "relation_holds",
    "score",
    "shape_template",
]

CATEGORIES: tuple[str, ...] = ("single", "two_objects", "position", "color")


@dataclass(frozen=True)
class Prompt:
    """A benchmark prompt: its category, text, objects as (colour, shape), and relation (position prompts only)."""

    category: str
    text: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    def ground_truth(self, rng: np.random.Generator) -> Scene:
        """A rendered-scene spec that satisfies this prompt, placed by ``rng``."""
        kind = {"single": "single", "color": "single", "two_objects": "and", "position": "relation"}[self.category]
        return scene_for(kind, self.objects, self.relation, rng)


# ------------------------------------------------------------------------------------------------------- scoring
def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """True when ``first relation second`` for centroids (row, col): the relation's axis must dominate the offset."""
    d_row, d_col = first[0] - second[0], first[1] - second[1]
    if relation == "left of":
        return d_col < 0 and abs(d_col) >= abs(d_row)
    if relation == "right of":
        return d_col > 0 and abs(d_col) >= abs(d_row)
    if relation == "above":
        return d_row < 0 and abs(d_row) >= abs(d_col)
    if relation == "below":
        return d_row > 0 and abs(d_row) >= abs(d_col)
    raise ValueError(f"unknown relation {relation!r}")


def score(prompt: Prompt, detections: list[Detection]) -> bool:
    """Whether ``detections`` satisfy ``prompt`` under its category's rule."""
    if prompt.category == "color":
        return len(detections) == 1 and detections[0].color == prompt.objects[0][0]
    wanted = Counter(prompt.objects)
    if Counter((d.color, d.shape) for d in detections) != wanted:
        return False
    if prompt.category != "position":
        return True
    first = next(d for d in detections if (d.color, d.shape) == prompt.objects[0])
    second = next(d for d in detections if (d.color, d.shape) == prompt.objects[1] and d is not first)
    assert prompt.relation is not None
    return relation_holds(first.center, second.center, prompt.relation)


def benchmark_prompts(n_per_category: int = 60, seed: int = 1234) -> list[Prompt]:
    """The fixed benchmark: ``n_per_category`` prompts in each of the four categories (default 240 in all)."""
    rng = np.random.default_rng(seed)
    colors, prompts = list(COLORS), []

    def attr() -> tuple[str, str]:
        return colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))]

    def pair() -> tuple[tuple[str, str], tuple[str, str]]:
        a, b = attr(), attr()
        while b == a:
            b = attr()
        return a, b

    for category in CATEGORIES:
        for _ in range(n_per_category):
            if category in ("single", "color"):
                a = attr()
                prompts.append(Prompt(category, f"a {a[0]} {a[1]}", (a,)))
            elif category == "two_objects":
                a, b = pair()
                prompts.append(Prompt(category, f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", (a, b)))
            else:
                a, b = pair()
                rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
                prompts.append(Prompt(category, f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}", (a, b), rel))
    return prompts


def evaluate(prompts: list[Prompt], images: np.ndarray, mode: Mode = "robust") -> dict[str, float | int]:
    """Score uint8 images ``(N, 32, 32, 3)``, one per prompt (repeat prompts for several seeds), by the ``mode``
    detector (``"strict"``: the original scorer, same results as before ``robust`` existed).

    Returns ``{"overall", "single", "two_objects", "position", "color", "n_images"}``.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for prompt, detections in zip(prompts, detect_all(np.asarray(images), mode), strict=False):
        hits[prompt.category].append(score(prompt, detections))
    result: dict[str, float | int] = {c: float(np.mean(h)) if h else float("nan") for c, h in hits.items()}
    present = [result[c] for c in CATEGORIES if hits[c]]
    result["overall"] = float(np.mean(present))
    result["n_images"] = len(images)
    return {k: result[k] for k in ("overall", *CATEGORIES, "n_images")}


def ground_truth_images(prompts: list[Prompt], seeds: list[int]) -> tuple[list[Prompt], np.ndarray]:
    """Rendered ground truth for every (prompt, seed): the repeated prompt list and images ``(N, 32, 32, 3)``."""
    rows, images = [], []
    for seed in seeds:
        for i, prompt in enumerate(prompts):
            rows.append(prompt)
            images.append(render(prompt.ground_truth(np.random.default_rng([seed, i]))))
    return rows, np.stack(images)
