"""Image + caption sources and resolution buckets, for encoding real images into a latent cache.

Two sources, both read with the standard library and PIL only:

* a folder of ``key.png`` / ``key.jpg`` (``.jpeg``) / ``key.webp`` images, each with a ``key.txt`` caption next to it;
* webdataset tar shards (``--shards 'data-*.tar'``, ``.tar.gz`` too): members ``key.png|jpg|jpeg|webp`` + ``key.txt``,
  read with :mod:`tarfile` (no webdataset dependency), each shard opened once and read in order
  (:func:`read_images`). The key is the member path up to the first dot of its file name.

The scan (:func:`scan_folder`, :func:`scan_shards`) reads captions and image headers only: the pixels are read once,
while encoding, so a large shard set is not read twice (a gzipped shard is still decompressed by both passes, since
its members can only be found by reading through it: keep large shard sets uncompressed, as images are already).

Photos are decoded upright: their EXIF orientation is applied (to the size that picks the bucket, too).

Every image is assigned the resolution bucket with the closest aspect ratio (in log space), resized to cover it and
centre-cropped. Buckets are a small fixed set of ``(H, W)`` with about the pixel count of ``resolution²``, both sides
multiples of ``multiple`` (the VAE scale factor times the transformer's patch size).
"""

from __future__ import annotations

import glob
import io
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppcl.errors import ConfigError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
"""Width:height ratios the buckets are made from (duplicates after rounding are dropped)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image + caption: ``path`` is the image file, or the tar file with ``member`` naming the image in it."""

    key: str
    caption: str
    path: str
    member: str | None = None
    size: tuple[int, int] = (0, 0)  # (width, height)

    def open(self, tar: tarfile.TarFile | None = None):
        """The image as an upright RGB ``PIL.Image`` (decoded now; an unreadable file raises :class:`ConfigError`).

        ``tar``: this record's shard, already open (:func:`read_images` passes it so a shard is opened once).
        """
        try:
            if self.member is None:
                return _decode(self.path)
            if tar is not None:
                return _decode(io.BytesIO(tar.extractfile(self.member).read()))  # type: ignore[union-attr]
            with tarfile.open(self.path) as shard:
                return _decode(io.BytesIO(shard.extractfile(self.member).read()))  # type: ignore[union-attr]
        except (OSError, ValueError, tarfile.TarError, AttributeError) as exc:
            raise _unreadable(self, exc) from exc


def read_images(records: list[ImageRecord]) -> Iterator[tuple[ImageRecord, Any]]:
    """``(record, upright RGB image)`` for every record, in order; consecutive records of one tar shard share one
    open tar file (opening it re-reads every member header; a gzipped shard would be decompressed again)."""
    tar: tarfile.TarFile | None = None
    try:
        for record in records:
            if record.member is not None and (tar is None or tar.name != os.path.abspath(record.path)):
                if tar is not None:
                    tar.close()
                try:
                    tar = tarfile.open(record.path)
                except (OSError, tarfile.TarError) as exc:
                    raise _unreadable(record, exc) from exc
            yield record, record.open(tar if record.member is not None else None)
    finally:
        if tar is not None:
            tar.close()


def _decode(source: Any):
    from PIL import Image, ImageOps

    with Image.open(source) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


_ROTATED = frozenset({5, 6, 7, 8})
"""EXIF orientations that display the stored image transposed (width and height swap)."""


def _unreadable(record: ImageRecord, exc: BaseException) -> ConfigError:
    where = record.path if record.member is None else f"{record.path}:{record.member}"
    return ConfigError(
        "an image cannot be read",
        expected="a PNG, JPEG or WebP image",
        found=f"{where}: {exc}",
        fix="remove or replace the file",
    )


def make_buckets(
    resolution: int, multiple: int, ratios: tuple[tuple[int, int], ...] = ASPECT_RATIOS
) -> list[tuple[int, int]]:
    """``(H, W)`` buckets with about ``resolution²`` pixels, sides multiples of ``multiple``, square first."""
    if resolution < multiple or resolution % multiple:
        raise ConfigError(
            "resolution does not fit the model",
            expected=f"a positive multiple of {multiple} (VAE scale factor x patch size)",
            found=str(resolution),
            fix=f"use e.g. --resolution {max(multiple, resolution // multiple * multiple)}",
        )
    buckets: list[tuple[int, int]] = []
    for w_ratio, h_ratio in ratios:
        a = w_ratio / h_ratio
        h = max(multiple, round(resolution / math.sqrt(a) / multiple) * multiple)
        w = max(multiple, round(resolution * math.sqrt(a) / multiple) * multiple)
        if (h, w) not in buckets:
            buckets.append((h, w))
    return buckets


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to that of an image of ``size = (width, height)``."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i))


def to_bucket(image, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize (bicubic) to cover ``bucket = (H, W)``, centre-crop, and scale to ``[-1, 1]``: ``(3, H, W)`` float32."""
    from PIL import Image

    h, w = bucket
    scale = max(h / image.height, w / image.width)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def scan_folder(folder: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of every ``key.png|jpg|jpeg|webp`` + ``key.txt`` pair in ``folder`` (not recursive), sorted by key."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(
            "image folder not found",
            expected="a folder of key.png|jpg + key.txt pairs",
            found=str(folder),
            fix="pass an existing folder to --images",
        )
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    captions = {p.stem: p for p in root.iterdir() if p.is_file() and p.suffix == ".txt"}
    records = []
    for image in images:
        if image.stem not in captions:
            raise ConfigError(
                "an image has no caption",
                expected=f"{image.stem}.txt next to {image.name}",
                found=f"no caption file for {image}",
                fix="add the caption file or remove the image",
            )
        record = ImageRecord(image.stem, captions[image.stem].read_text().strip(), str(image))
        records.append(_with_size(record, None))
    return _check(records, str(folder))


def scan_shards(pattern: str) -> list[ImageRecord]:
    """Records of every image + caption pair in the tar shards matching ``pattern`` (a glob), sorted by shard/key."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError(
            "no tar shards match",
            expected="a glob matching webdataset .tar files",
            found=repr(pattern),
            fix="quote the pattern and check the path, e.g. --shards 'data-*.tar'",
        )
    records = []
    for path in paths:
        try:
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in members:
                    directory, _, name = m.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    by_key.setdefault(key, {})["." + ext.lower()] = m
                for key in sorted(by_key):
                    parts = by_key[key]
                    image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
                    if image is None:
                        continue  # other webdataset members (json, npy, ...) are ignored
                    if ".txt" not in parts:
                        raise ConfigError(
                            "an image has no caption",
                            expected=f"a member {key}.txt",
                            found=f"only {image.name} in {path}",
                            fix="add the caption to the shard",
                        )
                    caption = tar.extractfile(parts[".txt"]).read().decode("utf-8").strip()  # type: ignore[union-attr]
                    record = ImageRecord(key, caption, path, image.name)
                    records.append(_with_size(record, tar.extractfile(image)))
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "a tar shard cannot be read",
                expected="an uncompressed or gzipped tar file",
                found=f"{path}: {exc}",
                fix="re-create the shard",
            ) from exc
    return _check(records, pattern)


def _with_size(record: ImageRecord, source: Any | None) -> ImageRecord:
    """The record with its upright image size, from the image's header alone.

    ``source``: an open file object of a tar member (``None``: the record's own file). Only the header is read — no
    pixels are decoded or copied, so a shard set is read once, while encoding; a file that is not an image raises
    here, one whose pixel data is damaged raises while encoding (the cache is then not written).
    """
    from PIL import Image

    try:
        with Image.open(record.path if source is None else source) as img:
            size = img.size[::-1] if _orientation(img) in _ROTATED else img.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise _unreadable(record, exc) from exc
    if min(size) < 1:
        raise _unreadable(record, ValueError(f"size {size}"))
    return ImageRecord(record.key, record.caption, record.path, record.member, size)


def _orientation(img: Any) -> int | None:
    """The EXIF orientation found in the header metadata (``img.info``), without decoding the image.

    PIL's PNG ``getexif`` decodes the whole image to look for an EXIF chunk after the pixel data; the base-class
    method reads only what the header gave. A PNG whose EXIF chunk follows the pixels is then bucketed by its stored
    size: the encoder picks each image's bucket from the decoded (upright) image, so the cache is right either way.
    """
    from PIL import Image

    return Image.Image.getexif(img).get(0x0112)


def _check(records: list[ImageRecord], where: str) -> list[ImageRecord]:
    if not records:
        raise ConfigError(
            "no images found",
            expected="key.png|jpg|jpeg images with key.txt captions",
            found=f"none in {where}",
            fix="point to the data, or add images",
        )
    counts = Counter(r.key for r in records)
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    if duplicates:
        raise ConfigError(
            "image keys are not unique",
            expected="one image per key",
            found=f"duplicates {duplicates[:5]}",
            fix="rename the files or drop the duplicates",
        )
    return records
