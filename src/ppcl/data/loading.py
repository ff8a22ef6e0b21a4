"""Loading real models from local folders (never from a hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ppcl.arch import get_spec
from ppcl.errors import ArtefactError
from ppcl.io import read_json

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


DTYPE_CHOICES: tuple[str, ...] = tuple(_DTYPES)
"""The names ``--dtype`` accepts."""


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16`` etc.; unknown names raise :class:`ArtefactError`-style errors."""
    from ppcl.errors import ConfigError

    if name not in _DTYPES:
        raise ConfigError("unknown dtype", expected=" | ".join(_DTYPES), found=name, fix="pass e.g. --dtype bf16")
    return _DTYPES[name]


def load_transformer(path: str | os.PathLike[str], dtype: torch.dtype | None = torch.float32) -> Any:
    """A supported diffusers transformer from a local folder: a transformer folder or a pipeline folder (``dtype``
    ``None``: diffusers' default)."""
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config = folder / "config.json"
    if not config.is_file():
        raise ArtefactError(
            "no diffusers model here",
            expected="a folder with config.json (or transformer/)",
            found=str(path),
            fix="pass a local pipeline or transformer folder",
        )
    import json

    import diffusers

    class_name = json.loads(config.read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ArtefactError(
            "unknown model class in config.json",
            expected="a diffusers transformer class",
            found=repr(class_name),
            fix="point to the transformer of a supported pipeline",
        )
    get_spec(cls)  # fail early for unsupported classes
    dtype_kwargs = {} if dtype is None else {"torch_dtype": dtype}
    model = cls.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs)
    return model.eval().requires_grad_(False)


def pipeline_class(path: str | os.PathLike[str]) -> type:
    """The diffusers pipeline class a local pipeline folder names (``model_index.json``), without loading anything."""
    import diffusers

    _require_pipeline_folder(path)
    name = read_json(Path(path) / "model_index.json", "pipeline index").get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        raise ArtefactError(
            "unknown pipeline class in model_index.json",
            expected="a diffusers pipeline class",
            found=repr(name),
            fix="use a pipeline this diffusers version has",
        )
    return cls


def load_pipeline_folder(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline from a local folder (``local_files_only``: nothing is downloaded)."""
    from diffusers import DiffusionPipeline

    _require_pipeline_folder(path)
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    get_spec(pipe.transformer)
    return pipe


def _require_pipeline_folder(path: str | os.PathLike[str]) -> None:
    if not (Path(path) / "model_index.json").is_file():
        raise ArtefactError(
            "not a diffusers pipeline folder",
            expected="a folder with model_index.json",
            found=str(path),
            fix="pass the folder written by `pipeline.save_pretrained`",
        )
