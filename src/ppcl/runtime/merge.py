"""Bake one level of an add-on into a new, smaller model (the base model is left untouched).

For depth-only levels the result is a plain instance of the base's diffusers class built from
``spec.rewrite_config(config, kept)``: each span keeps one block, at the span's first position, holding the student's
weights; all other blocks of the span are gone. It saves with diffusers ``save_pretrained`` and loads back with the
stock ``Class.from_pretrained``, without ppcl. The result carries its :class:`~ppcl.runtime.block_map.BlockMap` (the
base blocks behind each block; :func:`~ppcl.runtime.merge_width.save_merged` writes it as ``ppcl_blocks.json``) and a
pre-hook that maps ControlNet residuals given for the base's blocks onto its own (:mod:`ppcl.runtime.controlnet`). Levels with width replacements additionally get the substitutions of
:mod:`ppcl.runtime.merge_width` (dropped modules, cut modulation rows, projections); save them with
:func:`~ppcl.runtime.merge_width.save_merged` and load with :func:`~ppcl.runtime.merge_width.load_merged`.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from ppcl.addon import PruningAddon, has_adapter_layers, student_key
from ppcl.addon.card import hub_id_of
from ppcl.arch import ArchSpec, get_spec
from ppcl.errors import ConfigError
from ppcl.kinds import check_kinds, kind_of
from ppcl.runtime.apply import ADDON_ATTR
from ppcl.runtime.block_map import BlockMap
from ppcl.runtime.controlnet import attach_block_map
from ppcl.runtime.merge_width import install_merged_save, make_record, replay, substitution
from ppcl.runtime.width import check_width_support, level_modes, parts_for
from ppcl.storage import compute_dtype, has_quantized_weights


def merge(model: nn.Module, addon: PruningAddon, level: str, projection_dtype: torch.dtype | None = None) -> nn.Module:
    """A new model equal to ``model`` with ``addon`` at ``level``, with the replaced blocks physically removed.

    Works whether or not ``addon`` is applied to ``model``; ``model`` is not modified and shares no storage with the
    result. The result has ``model``'s dtype/device per tensor and its train/eval mode. Width maps (a level's
    projections) are cast to ``projection_dtype``, by default the model's compute dtype, so a bf16 model runs
    them in bf16 (pass ``torch.float32`` to keep trained float32 masters exact).

    Raises:
        AddonMismatchError: ``addon`` was made for another base model.
        ConfigError: ``level`` is unknown; the base has (unfused) adapter layers or quantised weights; or a student
            does not fit its new position (e.g. SD3.5: a student copied from a block without the second attention
            placed where the rewritten ``dual_attention_layers`` expects one).
    """
    if not isinstance(level, str):
        raise ConfigError(
            "merge needs a level name",
            expected=f"one of {addon.level_names}",
            found=repr(level),
            fix="the original model (level None) needs no merge",
        )
    addon.check_base(model)
    spec = get_spec(model)
    check_kinds(addon.plan.replacements)
    check_width_support(spec, model, addon.plan)
    all_reps = addon.plan.replacements_of(level)
    reps = [r for r in all_reps if kind_of(r).owns_student]
    if _has_base_adapters(model):
        raise ConfigError(
            "The base model carries adapter layers (e.g. a LoRA)",
            expected="a plain base model",
            found="PEFT tuner layers in the transformer",
            fix="fuse and unload the adapter (or remove it) before merging; re-apply a LoRA to the "
            "merged model with remap_lora_state_dict",
        )
    if has_quantized_weights(model):
        raise ConfigError(
            "The base model holds quantised weights",
            expected="a full-precision (or bf16/fp16) base to merge from",
            found="torchao / bitsandbytes quantised parameters in the transformer",
            fix="merge from the unquantised base, then quantise the merged model (it is a diffusers model); "
            "an add-on applies to a quantised base as it is",
        )
    kept = addon.plan.kept_blocks(level)
    config = spec.rewrite_config(dict(model.config), kept)
    spec.check_pruned_compatible(model, kept)

    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{ADDON_ATTR}.")}
    for rep in reps:
        name = spec.block_name(model, rep.span.start)
        student = addon.students[student_key(rep.id)].state_dict()
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in student.items()})
    state = spec.kept_state_dict(model, kept, state)

    # Parameters start on the meta device (nothing is allocated or randomly initialised for a 20B model), then take
    # clones of the final tensors; buffers and plain tensor attributes are built normally, as diffusers does.
    with init_empty_weights(include_buffers=False):
        merged = type(model).from_config(config)
    _check_students_fit(spec, merged, addon, reps, kept)
    merged.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    _copy_buffers(spec, model, merged, addon, reps, kept)
    if any(kind_of(r).is_width for r in all_reps):
        dtype = projection_dtype or compute_dtype(model)
        _apply_width(spec, merged, addon, level, all_reps, kept, dtype)
    base_model = hub_id_of(dict(model.config).get("_name_or_path"))
    attach_block_map(merged, BlockMap.from_plan(addon.plan, level, base_model))
    install_merged_save(merged)  # its save_pretrained (a pipeline's too) keeps the records
    merged.train(model.training)
    return merged


def _apply_width(
    spec: ArchSpec,
    merged: nn.Module,
    addon: PruningAddon,
    level: str,
    reps: list[Any],
    kept: list[int],
    dtype: torch.dtype,
) -> None:
    # Substitutions are recorded at merged positions; a span start's position holds its student, already loaded.
    from ppcl.plan import check_level_width

    check_level_width(addon.plan, level)
    position = {old: new for new, old in enumerate(kept)}
    subs, projections = [], {}
    for old, mode in level_modes(addon.plan, reps).items():
        new = position[old]
        subs.append(substitution(spec, merged, new, mode))
        parts = parts_for(addon.students, addon.plan, reps, old, mode)
        for name, module in (("text_in", parts.text_in), ("text_out", parts.text_out), *parts.ffn.items()):
            if module is not None:
                projections[(new, name)] = module
    record = make_record(type(merged).__name__, level, subs, dtype)
    replay(merged, record, projections, proj_dtype=dtype)


def _has_base_adapters(model: nn.Module) -> bool:
    # Students are always plain blocks; only the base model can carry a user's adapters.
    return any(has_adapter_layers(child) for name, child in model.named_children() if name != ADDON_ATTR)


def _check_students_fit(
    spec: ArchSpec, merged: nn.Module, addon: PruningAddon, reps: list[Any], kept: list[int]
) -> None:
    position = {old: new for new, old in enumerate(kept)}
    for rep in reps:
        new_block = spec.block(merged, position[rep.span.start])
        want = {k: tuple(v.shape) for k, v in new_block.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in addon.students[student_key(rep.id)].state_dict().items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))
            raise ConfigError(
                f"The student of {rep.id} (copied from block {rep.init_block}, init {rep.init!r}) does not fit its "
                f"position {spec.block_name(merged, position[rep.span.start])} in the merged model",
                expected="the parameter names and shapes the rewritten config builds at that position",
                found=f"differences {diff[:4]}{' ...' if len(diff) > 4 else ''}",
                fix="re-create the add-on with init='first' for this span (the merged config builds each kept "
                "position like the span's first block), or choose spans whose blocks are built alike",
            )


def _copy_buffers(
    spec: ArchSpec, model: nn.Module, merged: nn.Module, addon: PruningAddon, reps: list[Any], kept: list[int]
) -> None:
    # Non-persistent buffers are not in the state dict; take them (dtype, device, values) from the base model, and
    # those of a span's kept position from its student.
    source = {k: v for k, v in model.named_buffers() if not k.startswith(f"{ADDON_ATTR}.")}
    for rep in reps:
        name = spec.block_name(model, rep.span.start)
        source.update({f"{name}.{k}": v for k, v in addon.students[student_key(rep.id)].named_buffers()})
    renamed = spec.kept_state_dict(model, kept, source)
    for name, buffer in list(merged.named_buffers()):
        if name in renamed:
            owner_name, _, leaf = name.rpartition(".")
            owner = merged.get_submodule(owner_name) if owner_name else merged
            owner._buffers[leaf] = renamed[name].detach().clone()
        elif buffer.is_meta:
            raise ConfigError(
                f"Buffer {name} of the merged model has no source",
                expected="a buffer of the base",
                found="none",
                fix="report this as a ppcl bug",
            )
