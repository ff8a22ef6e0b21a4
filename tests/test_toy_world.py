"""ShapesWorld, the tokenizer and ShapesEval."""

from __future__ import annotations

import numpy as np
import pytest

from ppcl.errors import ConfigError
from ppcl.toy.shapes_eval import (
    Prompt,
    benchmark_prompts,
    classify_shape,
    detect,
    evaluate,
    ground_truth_images,
    score,
)
from ppcl.toy.tokenizer import MAX_TOKENS, WordTokenizer
from ppcl.toy.world import COLORS, RELATIONS, SHAPES, random_scene, render, sample_batch, shape_mask


def test_batches_are_deterministic_by_seed():
    a_img, a_cap = sample_batch(np.random.default_rng(7), 32)
    b_img, b_cap = sample_batch(np.random.default_rng(7), 32)
    c_img, c_cap = sample_batch(np.random.default_rng(8), 32)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (32, 3, 32, 32) and a_img.dtype == np.float32
    assert a_img.min() >= -1 and a_img.max() <= 1


def test_world_covers_every_shape_colour_and_relation():
    rng = np.random.default_rng(0)
    captions = " ".join(random_scene(rng).caption for _ in range(2000))
    for word in [*SHAPES, *COLORS, *RELATIONS, " and "]:
        assert word in captions


def test_two_object_scenes_never_touch():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = random_scene(rng, p_single=0.0)
        a, b = scene.objects
        rows_apart = a.top + a.size + 2 <= b.top or b.top + b.size + 2 <= a.top
        cols_apart = a.left + a.size + 2 <= b.left or b.left + b.size + 2 <= a.left
        assert rows_apart or cols_apart


@pytest.mark.parametrize("size", [10, 12, 14])
def test_fill_ratio_separates_the_shapes(size):
    for shape in SHAPES:
        mask = shape_mask(shape, size)
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert classify_shape(mask.sum() / box) == shape


def test_tokenizer_pads_masks_and_rejects_unknown_words():
    tok = WordTokenizer()
    ids, mask = tok(["a red circle left of a blue square", ""])
    assert ids.shape == mask.shape == (2, MAX_TOKENS)
    assert mask[0].sum() == 9 and mask[1].sum() == 1  # <s> + 8 words; the empty caption keeps <s>
    assert ids[0, 0] == ids[1, 0] == tok.index["<s>"]
    assert (ids[mask == 0] == 0).all()
    with pytest.raises(ConfigError, match="vocabulary"):
        tok(["a purple circle"])
    with pytest.raises(ConfigError, match="too long"):
        tok(["a red circle and a blue square and a green"])


def test_shapes_eval_is_perfect_on_ground_truth():
    rows, images = ground_truth_images(benchmark_prompts(), seeds=[0, 1, 2])
    result = evaluate(rows, images)
    assert result["n_images"] >= 500
    for key in ("overall", "single", "two_objects", "position", "color"):
        assert result[key] == 1.0, key


def test_benchmark_is_fixed_and_large_enough():
    a, b = benchmark_prompts(), benchmark_prompts()
    assert a == b and len(a) >= 200
    assert {p.category for p in a} == {"single", "two_objects", "position", "color"}


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blank"])
def test_shapes_eval_rejects_noise(kind):
    rows, _ = ground_truth_images(benchmark_prompts(), seeds=[0, 1])
    rng = np.random.default_rng(0)
    shape = (len(rows), 32, 32, 3)
    if kind == "uniform":
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    elif kind == "gaussian":
        images = np.clip(rng.normal(127.5, 127.5, size=shape), 0, 255).astype(np.uint8)
    else:
        images = np.full(shape, 24, dtype=np.uint8)
    assert evaluate(rows, images)["overall"] < 0.05


def _gt(prompt: Prompt, seed: int = 0) -> np.ndarray:
    return render(prompt.ground_truth(np.random.default_rng(seed)))


def test_scoring_rules_fail_on_wrong_attributes():
    red_circle = Prompt("single", "a red circle", (("red", "circle"),))
    assert score(red_circle, detect(_gt(red_circle)))
    assert not score(Prompt("single", "a blue circle", (("blue", "circle"),)), detect(_gt(red_circle)))
    assert not score(Prompt("single", "a red square", (("red", "square"),)), detect(_gt(red_circle)))
    # colour prompts ignore the shape but not the colour
    assert score(Prompt("color", "a red square", (("red", "square"),)), detect(_gt(red_circle)))
    assert not score(Prompt("color", "a green circle", (("green", "circle"),)), detect(_gt(red_circle)))


def test_scoring_rules_check_extra_objects_and_relations():
    objs = (("red", "circle"), ("blue", "square"))
    left = Prompt("position", "a red circle left of a blue square", objs, "left of")
    image = _gt(left)
    assert score(left, detect(image))
    assert not score(Prompt("position", "", objs, "right of"), detect(image))
    assert not score(Prompt("position", "", objs, "above"), detect(image))
    assert score(Prompt("two_objects", "", objs), detect(image))
    # an extra object breaks "single"; a missing one breaks "two_objects"
    assert not score(Prompt("single", "", (("red", "circle"),)), detect(image))
    single = _gt(Prompt("single", "", (("red", "circle"),)))
    assert not score(Prompt("two_objects", "", objs), detect(single))
