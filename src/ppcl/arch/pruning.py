"""Depth pruning as pure bookkeeping: which blocks survive, the rewritten config and the renumbered state dict.

These functions back :meth:`ArchSpec.rewrite_config`, :meth:`ArchSpec.kept_state_dict` and friends. ``kept`` is always
a list of *flat* block indices of the original model (see :mod:`ppcl.arch.spec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppcl.errors import ConfigError

if TYPE_CHECKING:
    from ppcl.arch.spec import ArchSpec


def check_kept(spec: ArchSpec, sizes: Sequence[int], kept: Sequence[int]) -> list[list[int]]:
    """Validate ``kept`` against stacks of ``sizes`` blocks; return the kept *local* indices of each stack.

    Raises:
        ConfigError: ``kept`` is empty, has duplicates or out-of-range indices, or drops a protected block.
    """
    total = sum(sizes)
    indices = [int(i) for i in kept]
    if not indices:
        raise ConfigError("No blocks are kept", expected="at least one kept block index", found="an empty list")
    if len(set(indices)) != len(indices):
        raise ConfigError("Kept block indices repeat", expected="distinct indices", found=str(indices))
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise ConfigError(
            "Kept block indices are out of range", expected=f"flat indices in [0, {total})", found=str(bad)
        )
    if spec.protect_last_block and total - 1 not in indices:
        raise ConfigError(
            f"The last block ({total - 1}) of a {spec.model_class_name} cannot be removed",
            expected=f"kept indices that include {total - 1}",
            found=str(sorted(indices)),
            fix=(
                "keep the last block: it is built differently (no text output, `context_pre_only`) and the config "
                "always builds the last position that way"
            ),
        )
    per_stack: list[list[int]] = []
    start = 0
    for size in sizes:
        per_stack.append(sorted(i - start for i in indices if start <= i < start + size))
        start += size
    return per_stack


def config_sizes(spec: ArchSpec, config: Mapping[str, Any]) -> list[int]:
    """Block count of each stack as written in ``config``."""
    missing = [s.config_key for s in spec.stacks if s.config_key not in config]
    if missing:
        raise ConfigError(
            f"The config is not a {spec.model_class_name} config",
            expected=f"entries {[s.config_key for s in spec.stacks]}",
            found=f"missing {missing}",
        )
    return [int(config[s.config_key]) for s in spec.stacks]


def rewrite_config(spec: ArchSpec, config: Mapping[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """See :meth:`ArchSpec.rewrite_config`."""
    per_stack = check_kept(spec, config_sizes(spec, config), kept)
    new = dict(config)
    for stack, local in zip(spec.stacks, per_stack, strict=True):
        new[stack.config_key] = len(local)
        new_position = {old: pos for pos, old in enumerate(local)}
        for key in stack.index_config_keys:
            old_list = config.get(key)
            if old_list is None:
                continue
            # Indices of removed blocks disappear; survivors move to their new position.
            moved = sorted(new_position[j] for j in old_list if j in new_position)
            new[key] = list(moved) if isinstance(old_list, list) else tuple(moved)
    return new


def kept_state_dict(
    spec: ArchSpec,
    model: nn.Module,
    kept: Sequence[int],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """See :meth:`ArchSpec.kept_state_dict`. Keys outside the block stacks are kept unchanged."""
    per_stack = check_kept(spec, spec.stack_sizes(model), kept)
    renames = {
        stack.attr: {old: new for new, old in enumerate(local)}
        for stack, local in zip(spec.stacks, per_stack, strict=True)
    }
    source = model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        attr, index, rest = _split_block_key(key, renames)
        if attr is None:
            out[key] = value
        elif index in renames[attr]:
            out[f"{attr}.{renames[attr][index]}.{rest}"] = value
    return out


def check_pruned_compatible(spec: ArchSpec, model: nn.Module, kept: Sequence[int]) -> None:
    """See :meth:`ArchSpec.check_pruned_compatible`."""
    config = dict(getattr(model, "config", {}))
    sizes = spec.stack_sizes(model)
    if config_sizes(spec, config) != sizes:
        raise ConfigError(
            "The model's config does not match its blocks",
            expected=f"stack sizes {sizes}",
            found=f"config sizes {config_sizes(spec, config)}",
            fix="rebuild the model from its config, or update model.config after editing blocks",
        )
    new_config = rewrite_config(spec, config, kept)
    # Building on the meta device allocates nothing, so this check is free even for 20B models.
    with torch.device("meta"):
        pruned = type(model).from_config(new_config)
    old_blocks = spec.blocks(model)
    new_blocks = spec.blocks(pruned)
    for new_i, old_i in enumerate(sorted(int(i) for i in kept)):
        old_shapes = {k: tuple(v.shape) for k, v in old_blocks[old_i].state_dict().items()}
        new_shapes = {k: tuple(v.shape) for k, v in new_blocks[new_i].state_dict().items()}
        if old_shapes != new_shapes:
            diff = sorted(set(old_shapes.items()) ^ set(new_shapes.items()))
            raise ConfigError(
                f"Kept block {old_i} does not fit position {new_i} of the pruned model",
                expected="identical parameter names and shapes",
                found=f"differences {diff[:4]}{' ...' if len(diff) > 4 else ''}",
                fix="keep a different set of blocks (e.g. blocks built with the same options as their new position)",
            )


def _split_block_key(key: str, stacks: Mapping[str, Any]) -> tuple[str | None, int, str]:
    """``"transformer_blocks.7.attn.to_q.weight"`` → ``("transformer_blocks", 7, "attn.to_q.weight")``."""
    for attr in stacks:
        prefix = attr + "."
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if index.isdigit():
                return attr, int(index), rest
    return None, -1, key
