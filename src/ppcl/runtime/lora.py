"""Renumber a base model's LoRA for a merged (depth-pruned) model.

A LoRA trained on the base model names blocks by their base index (``transformer_blocks.7.attn.to_q.lora_A.weight``).
In the merged model of a level, the survivors of each stack are renumbered consecutively, so block 7 may now be
``transformer_blocks.3``. Keys of removed blocks are dropped. Keys of a span's first block are kept and now apply to
the student sitting at that position: the student was trained to stand in for the whole span, so a base LoRA on a
replaced block is only an approximation there (exact everywhere else). While the add-on is *applied* (not merged) no
remapping is needed: the base keeps every block and its indices.

Keys are expected in diffusers / PEFT naming (with or without a ``transformer.`` or ``base_model.model.`` prefix);
convert other formats (e.g. kohya ``lora_unet_...``) with diffusers' loaders first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.plan import PruningPlan

_log = get_logger(__name__)
V = TypeVar("V")


def remap_lora_state_dict(
    lora_state_dict: Mapping[str, V], plan: PruningPlan, level: str, *, dropped: list[str] | None = None
) -> dict[str, V]:
    """The LoRA state dict renumbered for the merged model of ``level``; keys of removed blocks are left out.

    Args:
        lora_state_dict: LoRA tensors of the base model (any value type is passed through untouched).
        plan: the add-on's plan.
        level: the merged level.
        dropped: if given, the keys left out are appended to it (they are also logged).

    Returns:
        a new dict, same order, with ``<stack>.<old index>.`` rewritten to ``<stack>.<new index>.``.

    Raises:
        ConfigError: a key names a block index the plan's base model does not have (the LoRA is for another model).
    """
    spec = plan.spec()
    kept = plan.kept_blocks(level)
    per_stack = spec.check_kept(plan.stack_sizes, kept)
    renames = {
        stack.attr: {old: new for new, old in enumerate(local)}
        for stack, local in zip(spec.stacks, per_stack, strict=True)
    }
    sizes = {stack.attr: size for stack, size in zip(spec.stacks, plan.stack_sizes, strict=True)}
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
        out[".".join(parts)] = value
    if gone:
        _log.info(
            "remap_lora_state_dict: %d LoRA tensors of blocks removed by level %s dropped: %s",
            len(gone),
            level,
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


def _block_position(parts: list[str], stacks: Mapping[str, Any]) -> int | None:
    # Whole dotted components are compared, so `transformer_blocks` never matches inside `single_transformer_blocks`.
    for at in range(len(parts) - 1):
        if parts[at] in stacks and parts[at + 1].isdigit():
            return at
    return None


def _preview(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
