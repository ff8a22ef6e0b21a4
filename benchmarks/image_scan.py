"""Cost of scanning image sources before ``ppcl cache`` encodes them (issue 16, item 7): time per image and bytes read.

Writes ``--images`` noise PNGs (``--size`` pixels square, so they do not compress: about 3 bytes per pixel) as a
folder and as one uncompressed webdataset tar shard, then times :func:`~ppcl.data.images.scan_folder` and
:func:`~ppcl.data.images.scan_shards` (best of ``--repeats``, files in the page cache) and counts the bytes the shard
scan reads. The encoding pass reads every image once more, so bytes read by the scan are a second read of the data.
Appends to RESULTS.md unless ``--no-append``. CPU, seconds::

    .venv/bin/python benchmarks/image_scan.py
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from _results import append
from ppcl.data import images as images_module
from ppcl.data.images import scan_folder, scan_shards


class _CountingFile(io.FileIO):
    """A read-only file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        _CountingFile.read_bytes += len(data)
        return data


def _write(root: Path, count: int, size: int) -> tuple[Path, Path]:
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"k{i:05d}.png")
        (folder / f"k{i:05d}.txt").write_text(f"caption {i}\n")
    shard = root / "d-0.tar"
    with tarfile.open(shard, "w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=file.name)
    return folder, shard


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images to write (default 200)")
    parser.add_argument("--size", type=int, default=512, help="side of each square image in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default 3)")
    parser.add_argument("--label", default="", help="appended to the section title (e.g. the commit measured)")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard = _write(Path(tmp), args.images, args.size)
        folder_s = _best(lambda: scan_folder(folder), args.repeats)
        shard_s = _best(lambda: scan_shards(str(shard)), args.repeats)
        real_open = tarfile.open
        counting = lambda path, *a, **k: real_open(fileobj=_CountingFile(path, "rb"), mode="r")  # noqa: E731
        with mock.patch.object(images_module.tarfile, "open", counting):
            scan_shards(str(shard))
        total = shard.stat().st_size
    per = 1000 / args.images
    body = (
        f"{args.images} noise PNGs of {args.size}x{args.size} ({total / 2**20:.1f} MiB as one tar shard), files in the "
        "page cache.\n\n"
        "| scan | ms per image | bytes read by the scan |\n|---|---|---|\n"
        f"| folder (`scan_folder`) | {folder_s * per:.2f} | |\n"
        f"| tar shard (`scan_shards`) | {shard_s * per:.2f} | {_CountingFile.read_bytes / 2**20:.2f} MiB "
        f"({100 * _CountingFile.read_bytes / total:.1f}% of the shard) |\n"
    )
    print(body)
    if not args.no_append:
        title = "Image source scan: time and bytes read before encoding (issue 16)"
        append(f"{title}{', ' + args.label if args.label else ''}", body)


if __name__ == "__main__":
    main()
