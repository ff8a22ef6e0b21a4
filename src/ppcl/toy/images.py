"""Image grids and PNG files for the toy world."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ppcl.io import atomic_file


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 images ``(N, H, W, 3)`` into one uint8 image with ``ncols`` columns and ``pad`` white pixels."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write uint8 ``(H, W, 3)`` to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
