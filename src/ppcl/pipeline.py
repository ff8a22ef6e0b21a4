"""``ppcl.load_pipeline``: a ready-to-sample pipeline with an add-on applied or a merged model swapped in.

Example::

    import ppcl
    pipe = ppcl.load_pipeline(None, "runs/distill/addon", level="p40")    # toy teacher + add-on at level p40
    images = pipe(["a red circle left of a blue square"], seeds=0)        # uint8 (1, 32, 32, 3)
    pipe = ppcl.load_pipeline("toy", "runs/merged-p40")                   # toy text encoder + merged transformer
    pipe = ppcl.load_pipeline("/models/Qwen-Image", "runs/addon", level="p40")   # a diffusers pipeline, no network
    pipe = ppcl.load_pipeline("Qwen/Qwen-Image", "me/qwen-ppcl", level="p40")    # Hub ids, from the local cache

What the second argument is, is read from the folder: ``ppcl_addon.json`` → an add-on (applied in place at ``level``
on the base transformer, reversible with :func:`ppcl.remove_addon`); ``ppcl_merged.json`` → a width-merged model; a
plain diffusers ``config.json`` → a depth-merged stock model; both load with :func:`ppcl.load_merged`, which attaches
the ControlNet mapping of ``ppcl_blocks.json``. A merged model replaces the pipeline's transformer; a diffusers
pipeline then never loads its base transformer. Either argument may be a Hub id, read from the local cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.errors import ArtefactError, ConfigError
from ppcl.hub import resolve_folder
from ppcl.runtime.block_map import saved_path

_TOY_NAMES = (None, "toy")
ADDON_MANIFEST = "ppcl_addon.json"


@dataclass
class ToyPipeline:
    """The toy world's text encoder (from ``teacher``) with a transformer to sample from.

    Attributes:
        teacher: the toy teacher (tokenizer, text embedding; its own transformer is the base model).
        transformer: the transformer sampled from: the teacher's (possibly with an add-on applied) or a merged one.
    """

    teacher: Any
    transformer: nn.Module

    def __call__(
        self, prompts: list[str] | str, seeds: list[int] | int = 0, steps: int = 20, guidance: float = 4.0
    ) -> np.ndarray:
        """Images for ``prompts`` (one each; ``seeds`` an int = consecutive seeds from it), uint8 ``(N, 32, 32, 3)``."""
        from ppcl.toy.sampler import SamplerConfig, sample

        if steps < 1:
            raise ConfigError(
                "The number of sampling steps must be positive",
                expected="steps >= 1",
                found=str(steps),
                fix="pass e.g. steps=20",
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return sample(
            self.teacher,
            prompts,
            seeds,
            SamplerConfig(steps=steps, guidance=guidance),
            transformer=self.transformer,
            show_progress=False,
        )


def artefact_kind(folder: str | os.PathLike[str]) -> str:
    """``"addon"`` | ``"merged"`` (ppcl width merge) | ``"model"`` (stock diffusers folder) for ``folder``.

    Raises:
        ArtefactError: none of those files are there.
    """
    from ppcl.runtime import MERGED_FILE

    path = Path(folder)
    if (path / ADDON_MANIFEST).is_file():
        return "addon"
    if (path / MERGED_FILE).is_file():
        return "merged"
    if (path / "config.json").is_file():
        return "model"
    raise ArtefactError(
        f"{path} is neither an add-on nor a merged model",
        expected=f"a folder with {ADDON_MANIFEST} (add-on), {MERGED_FILE} or config.json (merged)",
        found="no such file" if path.is_dir() else "no such folder",
        fix="pass the OUT/addon folder of `ppcl distill` or the OUT of `ppcl merge`",
    )


def load_pipeline(
    base: str | os.PathLike[str] | None = None,
    addon_or_merged: str | os.PathLike[str] | None = None,
    level: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    revision: str | None = None,
    addon_revision: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    **pipeline_kwargs: Any,
) -> Any:
    """A pipeline for ``base`` with an add-on (at ``level``) or a merged model plugged in.

    Args:
        base: ``None`` or ``"toy"`` (the committed toy teacher: returns a :class:`ToyPipeline`), a local diffusers
            pipeline folder (with ``model_index.json``), or a Hub id resolved through the local Hugging Face cache.
        addon_or_merged: an add-on folder, a merged-model folder, a Hub id of either (from the cache), or ``None``
            (the base pipeline as is).
        level: the add-on level to activate (required with an add-on; refused with a merged model, whose level was
            fixed by ``ppcl merge``).
        dtype: weights dtype of the base pipeline and of a merged model.
        revision: the Hub revision of ``base``; ``addon_revision``: that of ``addon_or_merged``.
        local_files_only: never reach the network (default): Hub ids must already be in the cache (``hf download``);
            ``False`` lets ``huggingface_hub`` download them.
        cache_dir: the Hugging Face cache (default ``HF_HUB_CACHE``); token: for private Hub repos.
        pipeline_kwargs: passed to ``DiffusionPipeline.from_pretrained`` (e.g. a component object to use instead of
            the saved one). Components the folder records as absent (``[null, null]`` in ``model_index.json``, as
            ``save_pretrained`` writes for a pipeline built with ``text_encoder=None``) load as ``None``.

    Raises:
        ConfigError: a wrong combination (level without add-on, add-on without level, unknown base).
        ArtefactError: unreadable folders; AddonMismatchError: an add-on made for another base.
    """
    hub = {"local_files_only": local_files_only, "cache_dir": cache_dir, "token": token}
    if addon_or_merged is not None:
        addon_or_merged = resolve_folder(addon_or_merged, "add-on or merged model", revision=addon_revision, **hub)
    kind = artefact_kind(addon_or_merged) if addon_or_merged is not None else None
    if kind == "addon" and level is None:
        from ppcl.io import read_json

        levels = [
            lv.get("name")
            for lv in read_json(Path(addon_or_merged) / ADDON_MANIFEST, "add-on manifest")
            .get("plan", {})
            .get("levels", [])
        ]
        raise ConfigError(
            "An add-on needs a level to activate",
            expected=f"level= one of {levels}",
            found="None",
            fix="pass level=NAME (or merge that level with `ppcl merge` and load the merged folder)",
        )
    if kind in ("merged", "model") and level is not None:
        raise ConfigError(
            "A merged model has no levels to choose",
            expected="level=None with a merged folder",
            found=f"level={level!r}",
            fix="drop `level`, or pass the add-on folder instead",
        )
    if kind is None and level is not None:
        raise ConfigError(
            "A level needs an add-on",
            expected="addon_or_merged = an add-on folder",
            found=f"level={level!r} without an add-on",
            fix="pass the add-on folder too",
        )
    if base in _TOY_NAMES:
        from ppcl.toy.teacher import ToyTeacher

        teacher = ToyTeacher.load(dtype=dtype)
        transformer = _plug(teacher.transformer, addon_or_merged, kind, level, dtype)
        return ToyPipeline(teacher, transformer)
    folder = resolve_folder(base, "pipeline", revision=revision, **hub)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            "The base is not a toy name or a local diffusers pipeline folder",
            expected="None, 'toy' or a folder with model_index.json",
            found=str(base),
            fix="pass the folder written by `pipeline.save_pretrained`, or the Hub id of a diffusers pipeline",
        )
    if kind is None and "transformer" not in pipeline_kwargs and saved_path(folder / "transformer") is not None:
        # A pipeline saved with a merged transformer (pipe.save_pretrained): diffusers cannot rebuild a width merge.
        pipeline_kwargs["transformer"] = _load_merged(folder / "transformer", dtype)
    if kind in ("merged", "model"):
        # Handing the merged model to from_pretrained means the base transformer (20B for Qwen-Image) is never loaded.
        merged = _load_merged(addon_or_merged, dtype)
        return _load_diffusers_pipeline(folder, dtype, {**pipeline_kwargs, "transformer": merged})
    pipe = _load_diffusers_pipeline(folder, dtype, pipeline_kwargs)
    _plug(pipe.transformer, addon_or_merged, kind, level, dtype)
    return pipe


def _load_diffusers_pipeline(folder: Path, dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder, never the network; absent components stay ``None``."""
    from diffusers import DiffusionPipeline

    from ppcl.arch import get_spec
    from ppcl.io import read_json

    index = read_json(folder / "model_index.json", "pipeline index")
    # diffusers refuses to build a pipeline whose saved index lists a component as [null, null] unless the caller
    # passes it explicitly, although that is exactly what its own save_pretrained writes for a None component.
    absent = {
        k: None
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None
    }
    # The folder's own pipeline class, not DiffusionPipeline: diffusers decides which passed components replace the
    # saved ones from the class from_pretrained is called on, and a pipeline listing its transformer as optional
    # (WanPipeline) would otherwise load the saved transformer over a passed merged one.
    import diffusers

    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, DiffusionPipeline)):
        pipeline_class = DiffusionPipeline
    pipe = pipeline_class.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **{**absent, **kwargs})
    if getattr(pipe, "transformer", None) is None:
        raise ConfigError(
            "The pipeline has no transformer",
            expected="a pipeline with a `transformer` component",
            found=type(pipe).__name__,
            fix="pass the pipeline folder of a supported family (ppcl.arch.supported_classes())",
        )
    get_spec(pipe.transformer)  # unsupported architectures fail here, before anything is applied
    return pipe


def _plug(
    transformer: nn.Module,
    folder: str | os.PathLike[str] | None,
    kind: str | None,
    level: str | None,
    dtype: torch.dtype,
) -> nn.Module:
    """The transformer to sample from: ``transformer`` (with an add-on applied in place) or a loaded merged model."""
    if kind is None:
        return transformer
    if kind == "addon":
        from ppcl.addon import PruningAddon
        from ppcl.runtime import apply_addon

        addon = PruningAddon.from_pretrained(folder, transformer)
        apply_addon(transformer, addon, level=level)
        return transformer
    device = next(transformer.parameters()).device
    return _load_merged(folder, dtype).to(device)


def _load_merged(folder: str | os.PathLike[str], dtype: torch.dtype) -> nn.Module:
    """A merged model folder (width merges replay their record, depth-only ones are stock diffusers folders), with
    its ControlNet mapping attached when the folder has one (``ppcl_blocks.json``)."""
    from ppcl.runtime import load_merged

    return load_merged(folder, dtype=dtype).eval().requires_grad_(False)
