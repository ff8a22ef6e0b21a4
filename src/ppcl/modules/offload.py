"""Blocks offloaded by accelerate's hooks (``pipe.enable_sequential_cpu_offload()``, ``accelerate.cpu_offload``) or
diffusers' group offloading (``enable_group_offload``).

Sequential offload moves every parameter of a hooked module to the ``meta`` device and keeps the real values in the
hook's ``weights_map`` (on the CPU); the hook puts them on its ``execution_device`` for each forward and takes them
away after. A copy of such a block (a student's starting point) would be all ``meta``: :func:`materialise_` fills it
from the hooks' maps instead. Group offloading keeps real weights on its offload device (the CPU) between calls.
:func:`execution_device` says where a student standing in for either kind of block runs: students are not offloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _offload_hooks(module: nn.Module) -> Iterator[Any]:
    """The offloading hooks accelerate attached to ``module`` itself (a ``SequentialHook`` holds several)."""
    hook = module.__dict__.get("_hf_hook")
    for h in getattr(hook, "hooks", (hook,)):
        if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            yield h


GROUP_OFFLOAD_HOOK = "group_offloading"
"""The name diffusers registers its group-offloading hook under (``diffusers.hooks.group_offloading``)."""


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an offloaded ``module`` computes on: accelerate's hooks' ``execution_device`` or diffusers' group
    offloading's ``onload_device`` (its weights sit elsewhere between calls); ``None`` if not offloaded."""
    for sub in module.modules():
        for hook in _offload_hooks(sub):
            if hook.execution_device is not None:
                return torch.device(hook.execution_device)
        registry = sub.__dict__.get("_diffusers_hook")
        group = getattr(registry.get_hook(GROUP_OFFLOAD_HOOK) if registry is not None else None, "group", None)
        if getattr(group, "onload_device", None) is not None:
            return torch.device(group.onload_device)
    return None


def materialise_(clone: nn.Module, original: nn.Module) -> nn.Module:
    """Give ``clone`` (a deep copy of ``original``, same structure) the real values of the tensors accelerate
    offloaded from ``original`` (``meta`` in both), on the CPU where the hooks keep them. In place; returns ``clone``.

    Tensors that are not offloaded, and modules without offloading hooks, are left as they are.
    """
    copies = dict(clone.named_modules())
    for name, module in original.named_modules():
        target = copies.get(name)
        if target is None:
            continue
        for hook in _offload_hooks(module):
            for table in ("_parameters", "_buffers"):
                for key, tensor in list(getattr(target, table).items()):
                    if tensor is None or not tensor.is_meta or key not in hook.weights_map:
                        continue
                    value = hook.weights_map[key].detach().clone()
                    if table == "_parameters":
                        target._parameters[key] = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    else:
                        target._buffers[key] = value
    return clone
