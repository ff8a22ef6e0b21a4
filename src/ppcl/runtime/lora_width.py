"""A base LoRA on a width-merged model, under the policy of add-on mode.

With the add-on applied at a width level, a text-pruned block never calls its text modules (but text K/V), an
FFN-mapped stream never calls its FFN, and a modulation linear computes only its attention-half rows; a base LoRA on
those modules therefore adds nothing there, or only on those rows. A width merge deletes the modules and cuts the rows
(its record, ``ppcl_merged.json``, lists both per block), so the LoRA follows: keys of deleted modules are left out,
and the output rows (``lora_B``) of a cut modulation linear keep the rows the merge kept. The merged model with the
adapted LoRA then gives the add-on's images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import read_json
from ppcl.kinds import kind_of
from ppcl.plan import PruningPlan
from ppcl.runtime.block_map import BlockMap, saved_path
from ppcl.runtime.merge_width import MERGED_FILE, RECORD_ATTR

V = TypeVar("V")
DROP = object()
"""What :func:`fit_to_width` returns for a key of a module the merge deleted."""


def width_substitutions(
    merged: PruningPlan | BlockMap | nn.Module | str | os.PathLike[str], level: str | None
) -> dict[str, Mapping[str, Any]]:
    """``{merged block name, e.g. "transformer_blocks.3": substitution}`` of a width merge (the model's record, or the
    folder's ``ppcl_merged.json``); ``{}`` for a depth-only merge. A :class:`BlockMap` carries no width record.

    Raises:
        ConfigError: a plan whose ``level`` has width replacements (the module names come with the merged model).
    """
    if isinstance(merged, PruningPlan):
        if level is not None and any(kind_of(rep).is_width for rep in merged.replacements_of(level)):
            raise ConfigError(
                f"Level {level!r} prunes width: remapping a LoRA for its merge needs the merged model's record",
                expected="the merged model (ppcl.runtime.merge / ppcl.load_merged) or its folder",
                found="the add-on's plan",
                fix="pass the merged model or the folder `ppcl merge` wrote",
            )
        return {}
    if isinstance(merged, BlockMap):
        return {}
    if isinstance(merged, nn.Module):
        record, where = getattr(merged, RECORD_ATTR, None), f"the {type(merged).__name__}'s merged record"
    else:
        blocks = saved_path(merged)
        path = None if blocks is None else Path(blocks).parent / MERGED_FILE
        record = read_json(path, "merged-model record") if path is not None and path.is_file() else None
        where = str(path)
    if record is None:
        return {}
    return _by_block_name(record, where)


def _by_block_name(record: Mapping[str, Any], where: str) -> dict[str, Mapping[str, Any]]:
    """The record's substitutions by block name, each checked to have what :func:`fit_to_width` reads."""
    subs = record.get("substitutions")
    ok = isinstance(subs, list) and all(
        isinstance(sub, dict)
        and isinstance(sub.get("block_name"), str)
        and isinstance(sub.get("drop"), list)
        and isinstance(sub.get("cut_modulation"), dict)
        for sub in subs
    )
    if not ok:
        raise ArtefactError(
            f"{where} is incomplete",
            expected="substitutions: a list of {block_name (text), drop (list), cut_modulation (object)}",
            found=repr(subs)[:200],
            fix="re-save the merged model with ppcl.runtime.save_merged",
        )
    return {sub["block_name"]: sub for sub in subs}


def fit_to_width(key: str, inner: str, value: V, sub: Mapping[str, Any], lora: Mapping[str, Any]) -> V | object:
    """``value`` of LoRA tensor ``key`` fitted to a width-modified merged block, or :data:`DROP`.

    Args:
        key: the whole key (for messages and to find the matching ``lora_A``).
        inner: the part of ``key`` after the block, e.g. ``"img_mod.1.lora_B.weight"``.
        value: the tensor; only ``lora_B`` tensors of cut modulation linears change (their rows).
        sub: the block's substitution (its ``drop`` and ``cut_modulation`` entries).
        lora: the whole LoRA state dict.

    Raises:
        ConfigError: a DoRA magnitude on a cut modulation linear, or a ``lora_B`` without its ``lora_A``.
    """
    parts = inner.split(".")
    at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), len(parts))
    module, tensor = ".".join(parts[:at]), parts[at] if at < len(parts) else ""
    if any(module == name or module.startswith(name + ".") for name in sub["drop"]):
        return DROP
    chunks = sub["cut_modulation"].get(module)
    if chunks is None or tensor == "lora_A":
        return value
    if tensor != "lora_B" or not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"LoRA tensor {key!r} is on a modulation layer the width merge cut to its attention rows",
            expected="lora_A / lora_B tensors there (torch tensors: their rows are cut)",
            found=tensor if tensor != "lora_B" else f"a {type(value).__name__}",
            fix="apply the add-on instead of merging, or train the LoRA without that layer",
        )
    down_key = key.replace(".lora_B.", ".lora_A.", 1)
    if down_key.endswith(".bias"):  # a lora_B bias (peft's lora_bias): lora_A has a weight only
        down_key = down_key.removesuffix("bias") + "weight"
    down = lora.get(down_key)
    if not isinstance(down, torch.Tensor):
        raise ConfigError(
            f"LoRA tensor {key!r} has no lora_A beside it",
            expected=f"{down_key!r} in the same state dict",
            found="none",
            fix="pass the whole LoRA state dict",
        )
    d = down.shape[-1]  # the modulation linear's input width: every row chunk is d rows
    rows = torch.cat([torch.arange(int(c) * d, (int(c) + 1) * d) for c in chunks]).to(value.device)
    return value[rows]
