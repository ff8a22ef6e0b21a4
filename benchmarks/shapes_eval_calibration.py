"""ShapesEval calibration: robust and strict scores on perturbed rendered ground truth, noise and wrong scenes.

Everything here is built from rendered ground truth (``ground_truth_images`` / ``Prompt.ground_truth``), never from
images sampled from a model, so the robust scorer's thresholds cannot be tuned to a model's outputs:

* ground truth, blurred by a Gaussian of sigma 0.75 px, eroded / dilated by one pixel (each colour region's mask
  shrunk / grown by one pixel, 4-neighbour and 3x3 elements, background elsewhere), plus N(0, 0.25) noise in model
  units ([-1, 1], i.e. std 31.9 in uint8), each 4x4 patch set to its majority colour: should score high;
* pure noise (uniform uint8; Gaussian N(0, 1) in model units, like the sampler's starting noise): should score ~0;
* one object rendered with a wrong shape / a wrong colour, a missing object, an extra object: every image must fail
  (the score is the fraction that still passes).

The tests (tests/test_shapes_eval_robust.py) load this module and assert the same requirements at a smaller size.

    python benchmarks/shapes_eval_calibration.py                 # 60 prompts per category x 3 seeds, appends
    python benchmarks/shapes_eval_calibration.py --no-append     # print the table only
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from ppcl.toy.shapes_eval import CATEGORIES, Prompt, benchmark_prompts, evaluate
from ppcl.toy.world import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    MIN_SIZE,
    SHAPES,
    Scene,
    ShapeObject,
    render,
    shape_mask,
    to_model_range,
    to_uint8,
)

Images = np.ndarray  # uint8 (N, 32, 32, 3)
CROSS = ndimage.generate_binary_structure(2, 1)  # one pixel along rows and columns
BOX = ndimage.generate_binary_structure(2, 2)  # one pixel in all 8 directions
_PALETTE = np.array(list(COLORS.values()), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------- perturbations
def blur(images: Images, sigma: float = 0.75) -> Images:
    """Gaussian blur of ``sigma`` pixels in both image axes, rounded back to uint8."""
    out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _per_colour(images: Images, grow: bool, structure: np.ndarray) -> Images:
    """Each palette colour's region eroded (or dilated) by one pixel, background everywhere else."""
    op = ndimage.binary_dilation if grow else ndimage.binary_erosion
    out = np.empty_like(images)
    out[:] = BACKGROUND
    for n, image in enumerate(images):
        for colour in _PALETTE:
            region = (image == colour).all(axis=-1)
            if region.any():
                out[n][op(region, structure=structure)] = colour
    return out


def erode(images: Images, structure: np.ndarray = CROSS) -> Images:
    """Every object's mask shrunk by one pixel."""
    return _per_colour(images, grow=False, structure=structure)


def dilate(images: Images, structure: np.ndarray = CROSS) -> Images:
    """Every object's mask grown by one pixel."""
    return _per_colour(images, grow=True, structure=structure)


def model_noise(images: Images, std: float = 0.25, seed: int = 0) -> Images:
    """N(0, ``std``) added in model units ([-1, 1]), then back to uint8 as the sampler does (clip + round)."""
    x = to_model_range(images)
    return to_uint8(x + np.random.default_rng(seed).normal(0.0, std, x.shape).astype(np.float32))


def patch_majority(images: Images, patch: int = 4) -> Images:
    """Each ``patch x patch`` block set to its commonest colour (ties: the smallest RGB code), as 4x4 tokens might."""
    n, h, w, _ = images.shape
    code = (images[..., 0].astype(np.int64) << 16) | (images[..., 1].astype(np.int64) << 8) | images[..., 2]
    blocks = (
        code.reshape(n, h // patch, patch, w // patch, patch)
        .transpose(0, 1, 3, 2, 4)
        .reshape(n, h // patch, w // patch, -1)
    )
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(axis=-1)
    best = np.take_along_axis(blocks, (counts * (1 << 25) - blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    full = np.repeat(np.repeat(best, patch, axis=1), patch, axis=2)
    return np.stack([(full >> 16) & 255, (full >> 8) & 255, full & 255], axis=-1).astype(np.uint8)


def uniform_noise(n: int, seed: int = 0) -> Images:
    """Uniform random uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def gaussian_noise(n: int, seed: int = 0) -> Images:
    """N(0, 1) in model units (the sampler's starting noise), as uint8 images."""
    return to_uint8(np.random.default_rng(seed).standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))


# ------------------------------------------------------------------------------------------------------ negatives
def gt_scenes(prompts: list[Prompt], seeds: list[int]) -> tuple[list[Prompt], list[Scene]]:
    """The ground-truth scenes of ``ground_truth_images`` (same seeding), before rendering."""
    rows = [p for _ in seeds for p in prompts]
    scenes = [p.ground_truth(np.random.default_rng([seed, i])) for seed in seeds for i, p in enumerate(prompts)]
    return rows, scenes


def _other(value: str, options: list[str], rng: np.random.Generator) -> str:
    choices = [o for o in options if o != value]
    return choices[int(rng.integers(len(choices)))]


def wrong_shape(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object (drawn by ``rng``) rendered as another shape in the same box."""
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    objects = list(scene.objects)
    objects[k] = replace(obj, shape=_other(obj.shape, list(SHAPES), rng))
    return replace(scene, objects=tuple(objects))


def wrong_colour(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object (drawn by ``rng``) rendered in another palette colour."""
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    objects = list(scene.objects)
    objects[k] = replace(obj, color=_other(obj.color, list(COLORS), rng))
    return replace(scene, objects=tuple(objects))


def missing_object(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object (drawn by ``rng``) left out: an empty image for one-object prompts."""
    k = int(rng.integers(len(scene.objects)))
    return replace(scene, objects=tuple(o for i, o in enumerate(scene.objects) if i != k))


def extra_object(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """One more object of the smallest size, random colour and shape, two pixels clear of the others.

    None when no such spot is left (two large objects can fill the image).
    """
    drawn = (render(scene) != BACKGROUND).any(axis=-1)
    occupied = ndimage.binary_dilation(drawn, structure=BOX, iterations=2)
    shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
    mask = shape_mask(shape, MIN_SIZE)
    # clash[t, c]: the object drawn with its box at (t, c) would come within two pixels of another one.
    clash = (sliding_window_view(occupied, mask.shape) & mask).any(axis=(-2, -1))
    clash[0, :] = clash[:, 0] = clash[-1, :] = clash[:, -1] = True  # keep a one-pixel margin, as world.py does
    spots = np.argwhere(~clash)
    if len(spots) == 0:
        return None
    top, left = (int(v) for v in spots[int(rng.integers(len(spots)))])
    return replace(scene, objects=(*scene.objects, ShapeObject(shape, colour, MIN_SIZE, top, left)))


NEGATIVES: dict[str, Callable[[Scene, np.random.Generator], Scene | None]] = {
    "wrong shape": wrong_shape,
    "wrong colour": wrong_colour,
    "missing object": missing_object,
    "extra object": extra_object,
}


def negative_set(name: str, prompts: list[Prompt], seeds: list[int]) -> tuple[list[Prompt], Images]:
    """Rendered wrong scenes for every (prompt, seed); colour prompts are left out of "wrong shape" (they ignore
    the shape), and scenes with no room are left out of "extra object"."""
    make = NEGATIVES[name]
    rng = np.random.default_rng(7)
    rows, images = [], []
    for prompt, scene in zip(*gt_scenes(prompts, seeds), strict=False):
        if name == "wrong shape" and prompt.category == "color":
            continue
        wrong = make(scene, rng)
        if wrong is not None:
            rows.append(prompt)
            images.append(render(wrong))
    return rows, np.stack(images)


# ------------------------------------------------------------------------------------------------- the calibration
@dataclass(frozen=True)
class Case:
    """One calibration row: its images, their prompts and what the robust score must do ("high", "noise", "fail")."""

    name: str
    rows: list[Prompt]
    images: Images
    want: str


def calibration_cases(n_per_category: int = 60, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Case]:
    """Every calibration row, from the benchmark prompts' rendered ground truth."""
    prompts = benchmark_prompts(n_per_category)
    rows, scenes = gt_scenes(prompts, list(seeds))
    gt = np.stack([render(s) for s in scenes])
    n = len(rows)
    cases = [
        Case("ground truth", rows, gt, "exact"),
        Case("blur sigma 0.75 px", rows, blur(gt), "high"),
        Case("erode 1 px (4-neighbour)", rows, erode(gt), "high"),
        Case("dilate 1 px (4-neighbour)", rows, dilate(gt), "high"),
        Case("erode 1 px (3x3)", rows, erode(gt, BOX), "high"),
        Case("dilate 1 px (3x3)", rows, dilate(gt, BOX), "high"),
        Case("noise N(0, 0.25) model units", rows, model_noise(gt), "high"),
        Case("4x4 patch majority colour", rows, patch_majority(gt), "report"),
        Case("uniform noise images", rows, uniform_noise(n), "noise"),
        Case("Gaussian noise images", rows, gaussian_noise(n), "noise"),
    ]
    for name in NEGATIVES:
        neg_rows, neg_images = negative_set(name, prompts, list(seeds))
        cases.append(Case(name, neg_rows, neg_images, "fail"))
    return cases


WANT = {"exact": "= 1.0", "high": ">= 0.98", "noise": "<= 0.05", "fail": "0 (fraction passing)", "report": "(report)"}


def measure(cases: list[Case]) -> list[dict[str, object]]:
    """Robust and strict overall score (and the robust per-category scores) of every case."""
    out = []
    for case in cases:
        robust = evaluate(case.rows, case.images, mode="robust")
        strict = evaluate(case.rows, case.images, mode="strict")
        out.append(
            {"case": case.name, "n": len(case.rows), "want": WANT[case.want], "robust": robust, "strict": strict}
        )
    return out


def _fmt(value: object) -> str:
    return "–" if not isinstance(value, float) or np.isnan(value) else f"{value:.3f}"


def table(results: list[dict[str, object]]) -> str:
    """Markdown table of :func:`measure`'s results."""
    head = "| case | images | robust must be | robust | strict | " + " | ".join(f"robust {c}" for c in CATEGORIES)
    lines = [head + " |", "|---" * (5 + len(CATEGORIES)) + "|"]
    for r in results:
        robust, strict = r["robust"], r["strict"]
        assert isinstance(robust, dict) and isinstance(strict, dict)
        cats = " | ".join(_fmt(robust[c]) for c in CATEGORIES)
        lines.append(
            f"| {r['case']} | {r['n']} | {r['want']} | {_fmt(robust['overall'])} | {_fmt(strict['overall'])} | {cats} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=60, help="benchmark prompts per category")
    parser.add_argument("--seeds", type=int, default=3, help="ground-truth placements per prompt")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = measure(calibration_cases(args.per_category, tuple(range(args.seeds))))
    body = (
        f"Rendered ground truth of the ShapesEval benchmark prompts ({args.per_category} per category x "
        f"{args.seeds} seeds), perturbed; scores are `overall` (mean of the four categories; for the wrong-scene "
        f"rows, the fraction of images that still pass). No model samples are involved. "
        f"Time {time.perf_counter() - t0:.0f} s.\n\n" + table(results)
    )
    print(body)
    if not args.no_append:
        from _results import append  # imports torch (for the machine line); the tests never need it

        append("ShapesEval calibration: robust vs strict scorer on perturbed ground truth", body)


if __name__ == "__main__":
    main()
