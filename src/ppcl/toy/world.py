"""ShapesWorld: procedural 32x32 scenes of one or two coloured shapes, with captions.

Every scene is a pure function of its spec, and specs are drawn from a seeded generator, so the same seed always
gives the same images and captions. Shapes are drawn without anti-aliasing on a flat dark background, so the
rule-based scorer in :mod:`ppcl.toy.shapes_eval` recovers every ground-truth scene exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Object side lengths in pixels: large enough that fill ratios separate the shapes cleanly.
MIN_SIZE, MAX_SIZE = 10, 14


@dataclass(frozen=True)
class ShapeObject:
    """One object: its shape, colour name, side length and top-left corner (row, col)."""

    shape: str
    color: str
    size: int
    top: int
    left: int

    @property
    def center(self) -> tuple[float, float]:
        """(row, col) of the bounding-box centre."""
        return self.top + (self.size - 1) / 2, self.left + (self.size - 1) / 2


@dataclass(frozen=True)
class Scene:
    """A scene spec. ``relation`` is set only for two-object scenes captioned with a spatial relation."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        """The scene's caption, e.g. ``"a red circle left of a blue square"``."""
        names = [f"a {o.color} {o.shape}" for o in self.objects]
        if len(names) == 1:
            return names[0]
        joint = self.relation if self.relation is not None else "and"
        return f"{names[0]} {joint} {names[1]}"


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask ``(size, size)`` of a filled shape touching all four sides of its box."""
    r = np.arange(size)[:, None] + 0.5
    c = np.arange(size)[None, :] + 0.5
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        half = size / 2
        mask = (r - half) ** 2 + (c - half) ** 2 <= half**2
    elif shape == "triangle":
        # Apex at the top centre, base on the bottom row: half-width grows linearly with the row.
        half_width = (r / size) * (size / 2)
        mask = np.abs(c - size / 2) <= half_width + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def render(scene: Scene) -> np.ndarray:
    """Render ``scene`` to a uint8 image ``(32, 32, 3)``."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.size)
        region = img[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size]
        region[mask] = COLORS[obj.color]
    return img


def _place_single(rng: np.random.Generator, shape: str, color: str) -> ShapeObject:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    top = int(rng.integers(2, IMAGE_SIZE - size - 1))
    left = int(rng.integers(2, IMAGE_SIZE - size - 1))
    return ShapeObject(shape, color, size, top, left)


def _place_pair(
    rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str], relation: str
) -> tuple[ShapeObject, ShapeObject]:
    """Place two objects so that ``first relation second`` holds with a clear margin and no overlap."""
    s1, s2 = (int(v) for v in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
    horizontal = relation in ("left of", "right of")
    # Along the relation axis each object gets its own half of the image; across it, a small jitter around the
    # centre line, so the relation axis always dominates the offset between the two centres.
    first_low = relation in ("left of", "above")
    low_size, high_size = (s1, s2) if first_low else (s2, s1)
    # A gap of at least two pixels keeps two objects of the same colour from merging into one blob.
    low = int(rng.integers(1, 15 - low_size + 1))
    high = int(rng.integers(17, IMAGE_SIZE - high_size))
    pos1, pos2 = (low, high) if first_low else (high, low)
    across = [int(np.clip(16 - s // 2 + rng.integers(-3, 4), 1, IMAGE_SIZE - s - 1)) for s in (s1, s2)]
    if horizontal:
        o1 = ShapeObject(first[1], first[0], s1, across[0], pos1)
        o2 = ShapeObject(second[1], second[0], s2, across[1], pos2)
    else:
        o1 = ShapeObject(first[1], first[0], s1, pos1, across[0])
        o2 = ShapeObject(second[1], second[0], s2, pos2, across[1])
    return o1, o2


def _random_attr(rng: np.random.Generator) -> tuple[str, str]:
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return color, shape


def _random_distinct_pair(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    first = _random_attr(rng)
    second = _random_attr(rng)
    while second == first:
        second = _random_attr(rng)
    return first, second


def scene_for(kind: str, attrs: tuple[tuple[str, str], ...], relation: str | None, rng: np.random.Generator) -> Scene:
    """A scene of ``kind`` ("single" | "and" | "relation") with given (colour, shape) attributes, placed by ``rng``."""
    if kind == "single":
        color, shape = attrs[0]
        return Scene((_place_single(rng, shape, color),))
    if kind == "relation":
        assert relation is not None
        return Scene(_place_pair(rng, attrs[0], attrs[1], relation), relation)
    # "and": any of the four layouts, captioned without the relation.
    layout = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return Scene(_place_pair(rng, attrs[0], attrs[1], layout), None)


def random_scene(rng: np.random.Generator, p_single: float = 0.4, p_relation: float = 0.35) -> Scene:
    """Draw one scene: single object with prob ``p_single``, a related pair with ``p_relation``, else an "and" pair."""
    u = float(rng.random())
    if u < p_single:
        return scene_for("single", (_random_attr(rng),), None, rng)
    pair = _random_distinct_pair(rng)
    if u < p_single + p_relation:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return scene_for("relation", pair, relation, rng)
    return scene_for("and", pair, None, rng)


def sample_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` random scenes as float32 images ``(n, 3, 32, 32)`` in [-1, 1] and their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return to_model_range(images), [s.caption for s in scenes]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 32, 32, 3)`` → float32 ``(n, 3, 32, 32)`` in [-1, 1]."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float ``(n, 3, 32, 32)`` in [-1, 1] → uint8 ``(n, 32, 32, 3)``."""
    arr = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return arr.astype(np.uint8).transpose(0, 2, 3, 1)
