"""The ppcl logger and progress bars.

Library code never prints: it logs at stage boundaries through :func:`get_logger` and shows progress for anything
longer than a few seconds through :func:`progress`. Under multi-process runs only rank 0 shows either.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ROOT = "ppcl"


def _is_main_process() -> bool:
    # accelerate and torchrun both set RANK; plain runs have none and count as the main process.
    return os.environ.get("RANK", "0") == "0"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the ppcl logger, or a child of it (``ppcl.<name>``)."""
    logger = logging.getLogger(_ROOT if not name else f"{_ROOT}.{name.removeprefix(_ROOT + '.')}")
    return logger


_IMPORT_NOISE = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
"""Loggers of the optional quantisation libraries, which warn at import about GPU kernels a CPU has no use for
(torchao, bitsandbytes, and diffusers and torch about them): errors only, unless asked for with ``verbosity`` ≥ 1."""


def configure_logging(verbosity: int = 0) -> None:
    """Send ppcl logs to stderr; ``verbosity`` 0 → INFO, ≥1 → DEBUG, <0 → WARNING. Non-main ranks log warnings only.
    Below ``verbosity`` 1, the import-time warnings of :data:`_IMPORT_NOISE` are silenced."""
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    if not _is_main_process():
        level = logging.WARNING
    root = logging.getLogger(_ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_ppcl", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[ppcl %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        handler._ppcl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    if verbosity <= 0:
        for name in _IMPORT_NOISE:
            logging.getLogger(name).setLevel(logging.ERROR)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, disable: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar on stderr (rank 0 only; off when ``PPCL_NO_PROGRESS=1``)."""
    if disable is None:
        disable = (not _is_main_process()) or os.environ.get("PPCL_NO_PROGRESS") == "1"
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False))
