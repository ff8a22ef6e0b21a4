"""The two rule-based ShapesEval detectors: find the objects (colour, shape, area, centroid) in a 32x32 image.

Two detectors, both rule-based (no learned model is involved):

* ``robust`` (the default) tolerates the sub-pixel boundary noise of generated images. Every pixel is explained as
  a blend of the background and one palette colour (an object pixel when it is at least half colour) → isolated
  pixels take their neighbours' class → connected components per colour → each component is compared (IoU) with
  a circle, a square and a triangle drawn exactly as :mod:`ppcl.toy.world` draws them in the component's bounding
  box; two touching objects of one colour are cut at their neck → an image whose leftover non-background pixels
  add up to more than the smallest object is clutter (noise), not a scene.
* ``strict`` (the original scorer, kept bit-identical): each pixel goes to the nearest palette colour if it is
  close enough (else background) → connected components per colour (scipy) → small specks dropped → shape from the
  fill ratio of the component's bounding box (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2) → centroid. A cliff: one
  pixel lost or gained at a border flips the fill ratio (0.85 on ground truth blurred by 0.75 px).

The robust detector was calibrated on rendered ground truth only (blurred, eroded, dilated, noised; pure noise;
wrong, missing and extra objects), never on model samples: ``benchmarks/shapes_eval_calibration.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from ppcl.toy.world import BACKGROUND, COLORS, MIN_SIZE, SHAPES, shape_mask

Mode = Literal["robust", "strict"]
MODES: tuple[str, ...] = ("robust", "strict")
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)

# ---- strict detector
# A pixel belongs to a palette colour when within this RGB distance of it (palette colours are > 150 apart).
MAX_COLOR_DIST = 80.0
# Components smaller than this (pixels) are specks, not objects; the smallest object has ~50 pixels.
MIN_AREA = 16
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.65

# ---- robust detector (also drops components under MIN_AREA pixels: an object eroded by one pixel keeps >= 18)
# A pixel farther than this (RGB) from every background→colour blend line is unknown. Calibration noise of std 31.9
# per channel puts a pixel this far off its line with probability < 1%; real blends lie on the lines.
MAX_BLEND_DIST = 100.0
# Template IoU under which a component is no recognisable shape ("unknown"). Perturbed ground truth fits its own
# shape at >= 0.81 (benchmarks/shapes_eval_calibration.py), clean ground truth at 1.0 and a wrong template at <= 0.81.
MIN_SHAPE_IOU = 0.6
# Template IoU taken as a good fit. Below it, boxes one pixel off are tried and touching objects are split.
GOOD_FIT_IOU = 0.85
# Every object is drawn in a square box; a component more elongated than this holds several objects.
MAX_ASPECT = 1.25
# Pixels of the smallest rendered object (a triangle of side MIN_SIZE, 50). When the pixels that belong to no
# object (unknown, or in specks) add up to more than this, the image is clutter: random images have hundreds,
# perturbed ground truth a handful.
SMALLEST_OBJECT = int(min(shape_mask(s, MIN_SIZE).sum() for s in SHAPES))
# The detection reported for a cluttered image; it matches no prompt.
CLUTTER = "clutter"
# Pixel classes of the robust detector: background, the palette colours 1..len(COLORS), unknown.
_BACK, _UNKNOWN = 0, len(COLORS) + 1
_BG = np.array(BACKGROUND, dtype=np.float32)
_BLEND = _PALETTE - _BG  # direction of each background→colour blend line in RGB
_CHUNK = 512  # images per vectorised pixel-classification pass (bounds memory)
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as the strict detector's components


@dataclass(frozen=True)
class Detection:
    """One detected object: colour, shape, pixel area and centroid (row, col).

    The robust detector reports shape ``"unknown"`` for an object-sized blob that fits no shape, and a cluttered
    image as one detection of colour ``"none"`` and shape ``CLUTTER``.
    """

    color: str
    shape: str
    area: int
    center: tuple[float, float]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown ShapesEval mode {mode!r}; expected one of {MODES}")


def detect(image: np.ndarray, mode: Mode = "robust") -> list[Detection]:
    """Objects in one uint8 image ``(32, 32, 3)``, sorted by area (largest first), by the ``mode`` detector."""
    return detect_all(image[None], mode)[0]


def detect_all(images: np.ndarray, mode: Mode = "robust") -> list[list[Detection]]:
    """:func:`detect` for every uint8 image of ``(N, 32, 32, 3)`` (robust mode classifies pixels in batches)."""
    _check_mode(mode)
    if mode == "strict":
        return [_detect_strict(image) for image in images]
    return [_detect_robust(classes) for classes in _robust_classes(images)]


# ------------------------------------------------------------------------------------------------ strict detector
def classify_shape(fill: float) -> str:
    """Shape name from the fill ratio (area / bounding-box area) of a component (strict detector)."""
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= TRIANGLE_FILL:
        return "circle"
    return "triangle"


def _detect_strict(image: np.ndarray) -> list[Detection]:
    """The original detector: nearest palette colour within MAX_COLOR_DIST, shape from the bounding-box fill."""
    pixels = image.astype(np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, n_colours)
    nearest = dist.argmin(axis=-1)
    close = dist.min(axis=-1) <= MAX_COLOR_DIST
    found: list[Detection] = []
    for idx, name in enumerate(_NAMES):
        labels, count = ndimage.label(close & (nearest == idx))
        if count == 0:
            continue
        slices = ndimage.find_objects(labels)
        for lab, box in enumerate(slices, start=1):
            comp = labels[box] == lab
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            rows, cols = np.nonzero(comp)
            fill = area / comp.size
            center = (float(rows.mean() + box[0].start), float(cols.mean() + box[1].start))
            found.append(Detection(name, classify_shape(fill), area, center))
    return sorted(found, key=lambda d: -d.area)


# ------------------------------------------------------------------------------------------------ robust detector
def pixel_classes(images: np.ndarray) -> np.ndarray:
    """Class of every pixel of uint8 images ``(..., 3)``: 0 background, 1..4 a palette colour, 5 unknown.

    A blurred or anti-aliased border pixel is a blend of the object's colour and the background, so every pixel is
    projected on each background→colour line: it takes the nearest line's colour when it is at least half that
    colour (the half-way level is where the sharp border was) and is background otherwise. Nearest-palette
    assignment with a radius (strict) drops such pixels or gives them a wrong colour (a yellow/background blend is
    nearer green than yellow).
    """
    x = images.astype(np.float32) - _BG
    along = x @ _BLEND.T  # (..., n_colours)
    norms = (_BLEND**2).sum(axis=1)
    alpha = np.clip(along / norms, 0.0, 1.0)  # colour fraction of the nearest point on each line
    # Squared distance to that point: |x - alpha d|^2 = |x|^2 - 2 alpha x.d + alpha^2 |d|^2.
    residual = np.sqrt(np.maximum((x**2).sum(axis=-1, keepdims=True) - 2 * alpha * along + alpha**2 * norms, 0.0))
    line = residual.argmin(axis=-1)
    fraction = np.take_along_axis(alpha, line[..., None], axis=-1)[..., 0]
    classes = np.where(fraction >= 0.5, line + 1, _BACK)
    classes[residual.min(axis=-1) > MAX_BLEND_DIST] = _UNKNOWN
    return classes


def despeckle(classes: np.ndarray) -> np.ndarray:
    """Classes ``(N, H, W)`` where a pixel with no 8-neighbour of its own class takes its neighbours' commonest one.

    Pixel noise flips isolated pixels; a real object pixel always has a neighbour of its colour.
    """
    onehot = (classes[:, None] == np.arange(_UNKNOWN + 1)[None, :, None, None]).astype(np.int16)  # (N, C, H, W)
    neighbours = ndimage.correlate(onehot, np.ones((1, 1, 3, 3), np.int16), mode="constant") - onehot
    own = np.take_along_axis(neighbours, classes[:, None], axis=1)[:, 0]
    return np.where(own == 0, neighbours.argmax(axis=1), classes)


def _robust_classes(images: np.ndarray) -> Iterator[np.ndarray]:
    """Despeckled pixel classes ``(H, W)`` of each image, computed ``_CHUNK`` images at a time."""
    for start in range(0, len(images), _CHUNK):
        yield from despeckle(pixel_classes(images[start : start + _CHUNK]))


@cache
def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """``shape`` filling a ``height x width`` box as :func:`ppcl.toy.world.shape_mask` draws it (apex-up triangle).

    Equal to ``shape_mask(shape, size)`` for a square box; other boxes stretch the same shape.
    """
    r = (np.arange(height)[:, None] + 0.5) / height
    c = (np.arange(width)[None, :] + 0.5) / width
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = (r - 0.5) ** 2 + (c - 0.5) ** 2 <= 0.25 + 1e-9
    elif shape == "triangle":
        mask = np.abs(c - 0.5) <= r / 2 + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


@cache
def drawn_template(shape: str, height: int, width: int) -> np.ndarray:
    """The template whose drawn pixels span exactly ``height x width``.

    A triangle of even side leaves the top row of its box empty (its apex falls between two pixel centres), so
    what is drawn is one row shorter than its box: the box of ``shape_mask("triangle", 10)`` is 10 x 10, its
    drawn pixels 9 x 10.
    """
    if shape == "triangle":
        taller = shape_template(shape, height + 1, width)
        if not taller[0].any():
            return taller[1:]
    return shape_template(shape, height, width)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _box_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a component (cropped to its bounding box) with each shape's template in that box."""
    return {s: _iou(drawn_template(s, *mask.shape), mask) for s in SHAPES}


def _nearby_box_ious(mask: np.ndarray) -> dict[str, float]:
    """Best IoU per shape over boxes one pixel taller/shorter, wider/narrower and shifted by up to one pixel.

    A lost or gained row of border pixels (an apex, a stray pixel) moves the bounding box by one pixel.
    """
    height, width = mask.shape
    canvas, area = np.pad(mask, 1).astype(np.int32), int(mask.sum())
    best = _box_ious(mask)
    for h in (height - 1, height, height + 1):
        for w in (width - 1, width, width + 1):
            windows = sliding_window_view(canvas, (h, w))  # every placement of an h x w box, shifted by <= 1
            templates = np.stack([drawn_template(s, h, w) for s in SHAPES]).astype(np.int32)
            inter = np.tensordot(windows, templates, axes=([2, 3], [1, 2]))  # (tops, lefts, shapes)
            iou = inter / (templates.sum(axis=(1, 2)) + area - inter)
            for k, s in enumerate(SHAPES):
                best[s] = max(best[s], float(iou[..., k].max()))
    return best


def fit_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of a component cropped to its bounding box and its IoU; ``"unknown"`` if none fits."""
    ious = _box_ious(mask)
    if max(ious.values()) < GOOD_FIT_IOU:
        ious = _nearby_box_ious(mask)
    shape = max(ious, key=lambda s: ious[s])
    return (shape if ious[shape] >= MIN_SHAPE_IOU else "unknown"), ious[shape]


def _crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], (int(rows.min()), int(cols.min()))


def split_at_necks(mask: np.ndarray) -> list[np.ndarray]:
    """A component cut into the objects it may hold: cores deeper than the shallowest level that gives two or more
    (taxicab depth from the outside), every pixel going to its nearest core. ``[mask]`` when nothing separates.

    Two objects of one colour that touch (drawn two pixels apart, then grown by a pixel) meet at a neck that is
    shallower than both objects.
    """
    depth = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="taxicab")[1:-1, 1:-1]
    for level in range(2, int(depth.max()) + 1):
        cores, count = ndimage.label(depth >= level)
        if count >= 2:
            _, (rows, cols) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
            owner = cores[rows, cols]
            return [mask & (owner == k) for k in range(1, count + 1)]
    return [mask]


def _is_elongated(mask: np.ndarray) -> bool:
    return max(mask.shape) > MAX_ASPECT * min(mask.shape)


def _component_objects(color: str, mask: np.ndarray, origin: tuple[int, int]) -> list[Detection]:
    """Detections of one colour component (cropped to its box at ``origin``): one object, or the objects it holds
    when it fits no shape well or is elongated and cutting it at its necks explains it better."""
    shape, iou = fit_shape(mask)
    if iou < GOOD_FIT_IOU or _is_elongated(mask):
        parts = _better_split(mask, iou)
        if parts is not None:
            return [
                _detection(color, shape_, part, (origin[0] + top, origin[1] + left))
                for part, (top, left), shape_ in parts
            ]
    return [_detection(color, shape, mask, origin)]


def _better_split(mask: np.ndarray, whole_iou: float) -> list[tuple[np.ndarray, tuple[int, int], str]] | None:
    """The parts of ``mask`` cut at its necks (cropped, with offsets and shapes), if there are several, each is
    object-sized and fits a shape, and they fit better on average than the whole does; else None."""
    parts = [_crop(p) for p in split_at_necks(mask)]
    if len(parts) < 2:
        return None
    fits = [fit_shape(part) for part, _ in parts]
    if any(part.sum() < MIN_AREA or shape == "unknown" for (part, _), (shape, _) in zip(parts, fits, strict=False)):
        return None
    if float(np.mean([iou for _, iou in fits])) <= whole_iou:
        return None
    return [(part, offset, shape) for (part, offset), (shape, _) in zip(parts, fits, strict=False)]


def _detection(color: str, shape: str, mask: np.ndarray, origin: tuple[int, int]) -> Detection:
    rows, cols = np.nonzero(mask)
    return Detection(color, shape, int(mask.sum()), (float(rows.mean() + origin[0]), float(cols.mean() + origin[1])))


def _detect_robust(classes: np.ndarray) -> list[Detection]:
    """Objects of one image's despeckled pixel classes ``(H, W)``, or a single clutter detection."""
    leftover = classes == _UNKNOWN  # pixels that belong to no object
    components: list[tuple[str, np.ndarray, tuple[int, int]]] = []
    for idx, name in enumerate(_NAMES, start=1):
        labels, _ = ndimage.label(classes == idx, structure=_FOUR)
        speck = np.bincount(labels.ravel()) < MIN_AREA
        speck[0] = False
        leftover |= speck[labels]
        for lab, box in enumerate(ndimage.find_objects(labels), start=1):
            if not speck[lab]:
                components.append((name, labels[box] == lab, (box[0].start, box[1].start)))
    if leftover.sum() > SMALLEST_OBJECT:
        # Not a scene of objects on a background (e.g. noise): its objects are not worth fitting.
        return [_detection("none", CLUTTER, leftover, (0, 0))]
    found = [d for name, comp, origin in components for d in _component_objects(name, comp, origin)]
    return sorted(found, key=lambda d: -d.area)
