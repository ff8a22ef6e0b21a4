"""LoRAs and pruned models: save and load a LoRA trained with a level active, and renumber a base LoRA for a merged
(depth-pruned) model.

A LoRA added while an add-on is applied (``transformer.add_adapter``, peft) also wraps the students' layers under
``ppcl.<student>.``; ppcl hides ``ppcl.*`` from ``state_dict()``, so use :func:`lora_state_dict` to save it (e.g.
``FluxPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(pipe.transformer))``) and
:func:`load_lora` to load it onto a base with the same add-on applied.

A LoRA trained on the base model names blocks by their base index (``transformer_blocks.7.attn.to_q.lora_A.weight``).
In the merged model of a level, the survivors of each stack are renumbered consecutively, so block 7 may now be
``transformer_blocks.3``. Keys of removed blocks are dropped, and so are those of a span's first block, where the
student sits: with the add-on applied a student runs without the base LoRA (peft wraps only the base's layers), so
both modes give the same images (``keep_students=True`` puts them on the student instead, an approximation). While the
add-on is *applied* no remapping is needed: the base keeps every block and its indices. In a width merge, keys of the
modules the merge deleted are dropped too, and cut modulation layers keep their kept rows
(:mod:`ppcl.runtime.lora_width`): again the add-on's images.

Keys are expected in diffusers / PEFT naming (with or without a ``transformer.`` or ``base_model.model.`` prefix);
convert other formats (e.g. kohya ``lora_unet_...``) with diffusers' loaders first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ppcl.errors import ConfigError
from ppcl.io import load_tensors
from ppcl.logging import get_logger
from ppcl.plan import PruningPlan
from ppcl.runtime.apply import addon_keys_visible
from ppcl.runtime.block_map import BLOCK_MAP_ATTR, BlockMap
from ppcl.runtime.lora_width import DROP, fit_to_width, width_substitutions

_log = get_logger(__name__)
V = TypeVar("V")


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """peft's ``get_peft_model_state_dict`` of ``model`` with the students' LoRA layers (``ppcl.<student>.…``) kept;
    ``model`` has an add-on applied."""
    from peft.utils import get_peft_model_state_dict

    with addon_keys_visible(model):
        return get_peft_model_state_dict(model, adapter_name=adapter_name or "default")


def load_lora(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    adapter_name: str | None = None,
    prefix: str = "transformer",
    **kwargs: Any,
) -> None:
    """diffusers' ``model.load_lora_adapter(state_dict, prefix=...)`` onto a model with the same add-on applied as
    when the LoRA was saved, the students' layers included. ``source``: a state dict, a ``.safetensors`` file, or a
    folder written by a pipeline's ``save_lora_weights`` (``weight_name`` defaults to diffusers'
    ``pytorch_lora_weights.safetensors``); other ``kwargs`` go to ``load_lora_adapter``.

    Raises:
        ConfigError: no add-on is applied to ``model``.
        ArtefactError: the weights file is missing or unreadable.
    """
    if not isinstance(source, Mapping):
        path = Path(source)
        if path.is_dir():
            path = path / kwargs.pop("weight_name", "pytorch_lora_weights.safetensors")
        source = load_tensors(path, "LoRA")
    with addon_keys_visible(model):
        model.load_lora_adapter(dict(source), prefix=prefix, adapter_name=adapter_name, **kwargs)


def remap_lora_state_dict(
    lora_state_dict: Mapping[str, V],
    merged: PruningPlan | BlockMap | nn.Module | str | os.PathLike[str],
    level: str | None = None,
    *,
    dropped: list[str] | None = None,
    keep_students: bool = False,
) -> dict[str, V]:
    """The LoRA state dict renumbered for a merged model; keys of removed blocks are left out, and so are those of
    the blocks a student replaces (a span's first block): in add-on mode a student runs without the base LoRA, so the
    merged model then gives the add-on's images (one policy for both modes). For a width merge, keys of the modules
    it deleted are left out and ``lora_B`` of cut modulation layers keeps the kept rows
    (:func:`~ppcl.runtime.lora_width.fit_to_width`).

    Args:
        lora_state_dict: LoRA tensors of the base model (values are passed through untouched, of any type, except
            the ``lora_B`` tensors of modulation layers a width merge cut: torch tensors, whose rows are cut).
        merged: what describes the merged model: the add-on's plan (with ``level``; depth levels only), a
            merged-model folder written by ``ppcl merge`` (its ``ppcl_blocks.json`` and, for width merges,
            ``ppcl_merged.json``), a merged model from :func:`~ppcl.runtime.merge` / :func:`~ppcl.runtime.load_merged`,
            or its :class:`~ppcl.runtime.block_map.BlockMap` (which knows nothing of width: depth merges only).
        level: the merged level; required with a plan, ignored otherwise (the folder or model fixes it).
        dropped: if given, the keys left out are appended to it (they are also logged).
        keep_students: keep a span's first-block keys on its student instead (the merged model then differs from
            the add-on; a base LoRA on a student is an approximation either way).

    Returns:
        a new dict, same order, with ``<stack>.<old index>.`` rewritten to ``<stack>.<new index>.``.

    Raises:
        ConfigError: a key names a block index the base model does not have (the LoRA is for another model), a plan
            without a level or with a width level, a model without a block map, or a LoRA tensor on a cut modulation
            layer that cannot be cut (see :func:`~ppcl.runtime.lora_width.fit_to_width`).
        ArtefactError: a folder without (or with a malformed) ``ppcl_blocks.json``, or a malformed width record.
    """
    block_map = _block_map(merged, level)
    width = width_substitutions(merged, level)
    renames = {
        stack.attr: {
            old: new for new, old in enumerate(stack.starts) if keep_students or new not in stack.students
        }  # a student sits at its span's first position: no base LoRA goes there
        for stack in block_map.stacks
    }
    sizes = {stack.attr: stack.base_size for stack in block_map.stacks}
    out: dict[str, V] = {}
    gone: list[str] = []
    matched = 0
    for key, value in lora_state_dict.items():
        parts = key.split(".")
        at = _block_position(parts, renames)
        if at is None:
            out[key] = value
            continue
        matched += 1
        attr, index = parts[at], int(parts[at + 1])
        if index >= sizes[attr]:
            raise ConfigError(
                f"LoRA key {key!r} names block {index} of `{attr}`",
                expected=f"indices below {sizes[attr]} (the plan's base model)",
                found=str(index),
                fix="use a LoRA trained on the add-on's base model",
            )
        new = renames[attr].get(index)
        if new is None:
            gone.append(key)
            continue
        parts[at + 1] = str(new)
        sub = width.get(f"{attr}.{new}")
        if sub is not None:
            value = fit_to_width(key, ".".join(parts[at + 2 :]), value, sub, lora_state_dict)
            if value is DROP:
                gone.append(key)
                continue
        out[".".join(parts)] = value
    if gone:
        _log.info(
            "remap_lora_state_dict: %d LoRA tensors of blocks or modules removed, or of blocks replaced by students, "
            "at level %s dropped: %s",
            len(gone),
            block_map.level,
            _preview(gone),
        )
    if lora_state_dict and not matched:
        _log.warning(
            "remap_lora_state_dict: no key names a block (%s); is the LoRA in diffusers/PEFT format?",
            _preview(list(lora_state_dict)),
        )
    if dropped is not None:
        dropped.extend(gone)
    return out


def _block_map(merged: Any, level: str | None) -> BlockMap:
    if isinstance(merged, BlockMap):
        return merged
    if isinstance(merged, PruningPlan):
        if level is None:
            raise ConfigError(
                "remap_lora_state_dict needs the level with a plan",
                expected=f"level= one of {[lv.name for lv in merged.levels]}",
                found="None",
                fix="pass the merged level, or the merged folder / model instead of the plan",
            )
        return BlockMap.from_plan(merged, level)
    if isinstance(merged, nn.Module):
        found = getattr(merged, BLOCK_MAP_ATTR, None)
        if found is None:
            raise ConfigError(
                "The model carries no block map",
                expected="a model from ppcl.runtime.merge or ppcl.load_merged",
                found=type(merged).__name__,
                fix="load the merged folder with ppcl.load_merged, or pass the folder or the add-on's plan and level",
            )
        return found
    return BlockMap.load(merged)


def _block_position(parts: list[str], stacks: Mapping[str, Any]) -> int | None:
    # Whole dotted components are compared, so `transformer_blocks` never matches inside `single_transformer_blocks`.
    for at in range(len(parts) - 1):
        if parts[at] in stacks and parts[at + 1].isdigit():
            return at
    return None


def _preview(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
