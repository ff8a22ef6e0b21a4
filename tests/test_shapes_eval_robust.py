"""ShapesEval's robust scorer against its calibration requirements, and the strict scorer kept as it was.

Calibration uses rendered ground truth only (never model samples): the perturbations and wrong scenes come from
benchmarks/shapes_eval_calibration.py, which reports the same rows at full size.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

from bench_loader import benchmark_module
from ppcl.toy.benchmark import score_images
from ppcl.toy.shapes_eval import (
    CATEGORIES,
    CLUTTER,
    Prompt,
    benchmark_prompts,
    detect,
    drawn_template,
    evaluate,
    shape_template,
)
from ppcl.toy.world import BACKGROUND, COLORS, SHAPES, Scene, ShapeObject, render, shape_mask

SEEDS = [0, 1]  # 240 benchmark prompts x 2 placements = 480 images, 120 per category
PER_CATEGORY = 120

# Strict scorer on these images: passing images per category (single, two_objects, position, color), measured
# with the scorer as it was before the robust one existed. Bit-identical results must reproduce them exactly.
STRICT_PASSES = {
    "ground truth": (120, 120, 120, 120),
    "blur": (97, 94, 97, 120),
    "erode": (110, 108, 108, 120),
    "dilate": (120, 117, 117, 120),
    "noise": (117, 118, 118, 120),
    "patch majority": (48, 36, 41, 120),
}


@pytest.fixture(scope="module")
def cal() -> Iterator[ModuleType]:
    with benchmark_module("shapes_eval_calibration.py") as module:
        yield module


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return benchmark_prompts()


@pytest.fixture(scope="module")
def ground_truth(cal: ModuleType, prompts: list[Prompt]) -> tuple[list[Prompt], np.ndarray]:
    rows, scenes = cal.gt_scenes(prompts, SEEDS)
    return rows, np.stack([render(s) for s in scenes])


@pytest.fixture(scope="module")
def perturbed(cal: ModuleType, ground_truth: tuple[list[Prompt], np.ndarray]) -> dict[str, np.ndarray]:
    gt = ground_truth[1]
    return {
        "ground truth": gt,
        "blur": cal.blur(gt, 0.75),
        "erode": cal.erode(gt),
        "dilate": cal.dilate(gt),
        "noise": cal.model_noise(gt, 0.25),
        "patch majority": cal.patch_majority(gt),
    }


def test_ground_truth_is_rendered_like_the_benchmark(cal: ModuleType, prompts: list[Prompt]) -> None:
    from ppcl.toy.shapes_eval import ground_truth_images

    rows, images = ground_truth_images(prompts[:8], SEEDS)
    cal_rows, scenes = cal.gt_scenes(prompts[:8], SEEDS)
    assert rows == cal_rows and np.array_equal(images, np.stack([render(s) for s in scenes]))


@pytest.mark.parametrize("name", ["ground truth", "blur", "erode", "dilate", "noise"])
def test_robust_scores_perturbed_ground_truth_high(name: str, ground_truth, perturbed) -> None:
    result = evaluate(ground_truth[0], perturbed[name])
    floor = 1.0 if name == "ground truth" else 0.98
    assert result["overall"] >= floor, result
    assert min(result[c] for c in CATEGORIES) >= floor - 0.03, result


def test_perturbations_are_what_the_calibration_says(cal: ModuleType, ground_truth) -> None:
    grey = np.full((20, 32, 32, 3), 128, dtype=np.uint8)  # far from 0 and 255: no clipping
    assert 31 < np.std(cal.model_noise(grey).astype(np.int16) - 128) < 33  # std 0.25 in [-1, 1] = 31.9 in uint8
    eroded, dilated = cal.erode(ground_truth[1][:20]), cal.dilate(ground_truth[1][:20])
    objects = lambda im: (im != BACKGROUND).any(axis=-1).sum()  # noqa: E731
    assert objects(eroded) < objects(ground_truth[1][:20]) < objects(dilated)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_robust_rejects_pure_noise(kind: str, cal: ModuleType, ground_truth) -> None:
    rows = ground_truth[0]
    images = cal.uniform_noise(len(rows)) if kind == "uniform" else cal.gaussian_noise(len(rows))
    assert evaluate(rows, images)["overall"] <= 0.05
    assert [d.shape for d in detect(images[0])] == [CLUTTER]  # stray pixels everywhere: not a scene


@pytest.mark.parametrize("name", ["wrong shape", "wrong colour", "missing object", "extra object"])
def test_wrong_scenes_fail_in_both_modes(name: str, cal: ModuleType, prompts: list[Prompt]) -> None:
    rows, images = cal.negative_set(name, prompts, SEEDS[:1])
    assert len(rows) >= 150  # enough wrong scenes were built (colour prompts skip "wrong shape")
    for mode in ("robust", "strict"):
        result = evaluate(rows, images, mode=mode)
        assert result["overall"] == 0.0, (mode, result)


def test_strict_mode_is_unchanged(ground_truth, perturbed) -> None:
    for name, passes in STRICT_PASSES.items():
        result = evaluate(ground_truth[0], perturbed[name], mode="strict")
        expected = [n / PER_CATEGORY for n in passes]
        assert [result[c] for c in CATEGORIES] == expected, name
        assert result["overall"] == float(np.mean(expected)) and result["n_images"] == 4 * PER_CATEGORY


def test_score_images_reports_robust_on_top_and_strict_beside(ground_truth, perturbed) -> None:
    rows, images = ground_truth[0][::8], perturbed["blur"][::8]
    result = score_images(rows, images)
    assert set(result) == {"overall", *CATEGORIES, "n_images", "strict"}
    assert {k: v for k, v in result.items() if k != "strict"} == evaluate(rows, images, mode="robust")
    assert result["strict"] == evaluate(rows, images, mode="strict") and result["strict"]["overall"] < 0.95


def test_modes_are_checked() -> None:
    image = render(Scene((ShapeObject("circle", "red", 12, 5, 5),)))
    assert detect(image, mode="strict") == detect(image, mode="robust")
    with pytest.raises(ValueError, match="mode"):
        detect(image, mode="fuzzy")  # type: ignore[arg-type]


def test_templates_draw_what_the_world_draws() -> None:
    for shape in SHAPES:
        for size in range(8, 17):
            mask = shape_mask(shape, size)
            assert np.array_equal(shape_template(shape, size, size), mask), (shape, size)
            rows, cols = np.nonzero(mask)
            drawn = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert np.array_equal(drawn_template(shape, *drawn.shape), drawn), (shape, size)


def test_touching_objects_of_one_colour_are_split() -> None:
    # A red circle whose side touches a red square's side: one component, two objects.
    image = render(Scene((ShapeObject("square", "red", 12, 10, 2), ShapeObject("circle", "red", 12, 10, 14))))
    found = detect(image)
    assert sorted(d.shape for d in found) == ["circle", "square"] and {d.color for d in found} == {"red"}
    assert len(detect(image, mode="strict")) == 1


def test_specks_and_clutter() -> None:
    image = render(Scene((ShapeObject("triangle", "blue", 12, 8, 8),)))
    rng = np.random.default_rng(0)
    speckled = image.copy()
    spots = rng.choice(32 * 32, size=6, replace=False)
    speckled.reshape(-1, 3)[spots] = COLORS["yellow"]  # a few isolated wrong pixels: ignored
    assert [(d.color, d.shape) for d in detect(speckled)] == [("blue", "triangle")]
    cluttered = image.copy()
    spots = rng.choice(32 * 32, size=300, replace=False)
    cluttered.reshape(-1, 3)[spots] = rng.integers(0, 256, size=(300, 3))
    assert [d.shape for d in detect(cluttered)] == [CLUTTER]


def test_calibration_table_runs_at_tiny_size(cal: ModuleType) -> None:
    results = cal.measure(cal.calibration_cases(n_per_category=2, seeds=(0,)))
    text = cal.table(results)
    assert text.count("\n") == len(results) + 1 and "| ground truth | 8 | = 1.0 | 1.000 | 1.000 |" in text
