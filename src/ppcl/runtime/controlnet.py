"""ControlNet residuals on merged models: indexed by the base model's blocks, as in add-on mode.

A ControlNet gives ``L`` residuals per stack; the model adds residual ``k(i)`` to the image stream after block ``i``,
spacing them over its own number of blocks (:class:`~ppcl.arch.parts.ControlNetInput`). With an add-on applied the
model still has all its blocks: a span's student runs at its first block, the other blocks pass their input through,
and the model adds every one of the span's residuals after them. A merged model has fewer blocks, so diffusers would
space the residuals over the new count and add them at the wrong depths.

:class:`ControlNetRemap` is a forward pre-hook of the merged model that turns the base model's residual list into
one entry per merged block: the sum of the residuals of the base blocks it stands for (its
:class:`~ppcl.runtime.block_map.StackMap` source). The merged model then adds exactly what the add-on adds, so both
modes give the same images; :func:`~ppcl.runtime.merge` attaches it, and so do :func:`~ppcl.runtime.load_merged` and
:func:`ppcl.load_pipeline` from a merged folder's ``ppcl_blocks.json``. A depth-only merge loaded with the stock
``from_pretrained`` has no hook: call :func:`attach_block_map` on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppcl.arch import ControlNetInput, get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.runtime.block_map import BLOCK_MAP_ATTR, BlockMap, StackMap


@dataclass(frozen=True)
class _StackControl:
    control: ControlNetInput
    stack: StackMap
    takes: tuple[bool, ...]  # per merged position: whether the merged block gets a residual at all
    position: int | None  # positional index of the argument in the model's forward, if it has one
    repeat_position: int | None


class ControlNetRemap:
    """Forward pre-hook (``with_kwargs=True``) mapping base-indexed ControlNet residuals onto merged blocks.

    A callable object, so merged models stay deep-copyable.
    """

    def __init__(self, controls: Sequence[_StackControl]) -> None:
        self.controls = tuple(controls)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        args = list(args)
        for c in self.controls:
            samples = _take(args, kwargs, c.control.argument, c.position)
            if samples is None or len(samples) == 0:
                continue
            repeat = False
            if c.control.repeat_argument is not None:
                repeat = bool(_take(args, kwargs, c.control.repeat_argument, c.repeat_position))
                _put(args, kwargs, c.control.repeat_argument, c.repeat_position, False)
            mapped = map_residuals(c.control, c.stack, list(samples), repeat, c.takes)
            _put(args, kwargs, c.control.argument, c.position, mapped)
        return tuple(args), kwargs


def map_residuals(
    control: ControlNetInput,
    stack: StackMap,
    samples: list[torch.Tensor],
    repeat: bool,
    takes: Sequence[bool],
) -> list[torch.Tensor]:
    """One residual per merged block: the sum of those the base model adds after the blocks it stands for.

    Args:
        control: how the family spaces residuals over a stack.
        stack: the merged stack's map onto the base stack.
        samples: the ControlNet's ``L`` residuals for this stack, each ``(B, N_img, D)``, as given to the base model.
        repeat: the model's repeat switch (FLUX.1 XLabs ControlNets: residual ``i % L``).
        takes: per merged position, whether the merged model adds a residual there (SD3's last block does not).

    Returns:
        ``len(stack.starts)`` tensors ``(B, N_img, D)``; the merged model's own spacing then adds entry ``j`` after
        block ``j``.

    Raises:
        ConfigError: a residual would land where the merged model adds none (a removed block before a stack's first
            kept block, or a span ending at a block that takes no residual).
    """
    count = len(samples)
    base = [samples[control.residual_index(i, stack.base_size, count, repeat)] for i in range(stack.base_size)]
    if control.skip_flag is not None:
        # The base blocks that take no residual are exactly the merged positions that take none (SD3: the last
        # block, which a plan always keeps), so their starts mark them.
        for j, start in enumerate(stack.starts):
            if not takes[j]:
                base[start] = None
    if stack.lead:
        raise ConfigError(
            f"ControlNet residuals for `{stack.attr}` blocks {stack.lead.start}..{stack.lead.stop - 1} of the base "
            "model have no block in the merged model",
            expected="a merged model that keeps each stack's first block",
            found=f"the merged `{stack.attr}` starts at base block {stack.starts[0]}",
            fix="use the add-on (ppcl.apply_addon) with a ControlNet, or a plan that keeps the first block",
        )
    out = []
    for j in range(len(stack.starts)):
        parts = [base[i] for i in stack.source(j) if base[i] is not None]
        if parts and not takes[j]:
            raise ConfigError(
                f"merged `{stack.attr}.{j}` takes no ControlNet residual but stands for base blocks that do",
                expected="a span that does not end at a block without a residual",
                found=f"base blocks {stack.source(j).start}..{stack.source(j).stop - 1}",
                fix="use the add-on (ppcl.apply_addon) with a ControlNet",
            )
        out.append(_sum(parts) if parts else torch.zeros_like(samples[0]))
    return out


def attach_block_map(model: nn.Module, block_map: BlockMap) -> nn.Module:
    """Record ``block_map`` on a merged ``model`` and install its :class:`ControlNetRemap` (replacing any earlier one).

    Returns ``model`` (changed in place).

    Raises:
        ArtefactError: the map does not describe ``model`` (other class or block counts).
    """
    spec = get_spec(model)
    sizes = dict(zip((s.attr for s in spec.stacks), spec.stack_sizes(model), strict=True))
    have = {s.attr: len(s.starts) for s in block_map.stacks}
    if block_map.model_class != type(model).__name__ or have != sizes:
        raise ArtefactError(
            "The block map does not describe this merged model",
            expected=f"{type(model).__name__} with blocks per stack {sizes}",
            found=f"{block_map.model_class} with {have}",
            fix="load the merged model and its ppcl_blocks.json from the same `ppcl merge` folder",
        )
    setattr(model, BLOCK_MAP_ATTR, block_map)
    for key in [k for k, hook in model._forward_pre_hooks.items() if isinstance(hook, ControlNetRemap)]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    controls = _controls(model, block_map)
    if controls:
        model.register_forward_pre_hook(ControlNetRemap(controls), with_kwargs=True)
    return model


def _controls(model: nn.Module, block_map: BlockMap) -> list[_StackControl]:
    spec = get_spec(model)
    names = list(inspect.signature(type(model).forward).parameters)[1:]  # without `self`
    out = []
    for stack_spec, blocks in zip(spec.stacks, spec.stack_lists(model), strict=True):
        control = stack_spec.controlnet
        stack = block_map.stack(stack_spec.attr)
        if control is None or stack.is_identity:
            continue
        flag = control.skip_flag
        takes = tuple(not (flag is not None and bool(getattr(block, flag, False))) for block in blocks)
        out.append(
            _StackControl(
                control, stack, takes, _index(names, control.argument), _index(names, control.repeat_argument)
            )
        )
    return out


def _index(names: list[str], name: str | None) -> int | None:
    return names.index(name) if name in names else None


def _take(args: list[Any], kwargs: dict[str, Any], name: str, position: int | None) -> Any:
    if position is not None and position < len(args):
        return args[position]
    return kwargs.get(name)


def _put(args: list[Any], kwargs: dict[str, Any], name: str, position: int | None, value: Any) -> None:
    if position is not None and position < len(args):
        args[position] = value
    else:
        kwargs[name] = value


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
