"""Plain copies of teacher blocks, and their parameter shapes seen through any adapter wrappers.

A student block is a deep copy of a teacher block. The teacher may carry things that must not travel with the copy:
ppcl's own dispatcher (an instance-level ``forward``), accelerate / diffusers hooks (``_hf_hook``,
``_diffusers_hook``, a replaced ``forward``), forward hooks (e.g. an activation recorder) and PEFT adapter layers
(a LoRA wraps ``attn.to_q`` as ``attn.to_q.base_layer`` + ``lora_A``/``lora_B``). :func:`plain_block_copy` strips them,
so a student is always the bare diffusers block with the teacher's base weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ppcl.errors import ConfigError
from ppcl.modules import dispatch
from ppcl.modules.offload import materialise_
from ppcl.modules.quantized import dequantize_, gguf_copy_memo, replace_submodule
from ppcl.storage import logical_shape

LAYERWISE_CASTING_HOOK = "layerwise_casting"
"""The name diffusers registers its layerwise-casting hook under (``diffusers.hooks.layerwise_casting``)."""

# Attributes that hooking libraries put on a module instance to reroute its forward, and regional compilation's
# (a compiled call is bound to the original block: a copy keeping it would run the teacher).
_INSTANCE_HOOK_ATTRS: tuple[str, ...] = (
    "forward",
    "_hf_hook",
    "_old_forward",
    "_diffusers_hook",
    "_compiled_call_impl",
)
_HOOK_DICTS: tuple[str, ...] = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT-style tuner layer (wraps the original layer as ``base_layer``)."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and callable(
        getattr(module, "get_base_layer", None)
    )


def has_adapter_layers(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` is a PEFT-style tuner layer (e.g. a LoRA was added)."""
    return any(is_adapter_layer(m) for m in module.modules())


def plain_block_copy(block: nn.Module, *, allow_merged_adapters: bool = False) -> nn.Module:
    """A detached deep copy of ``block`` without hooks, dispatchers or adapter layers; same dtype and device, with
    quantised weights (torchao, bitsandbytes, GGUF) dequantised (:func:`ppcl.modules.quantized.dequantize_`) and weights
    offloaded by accelerate's sequential offload read back from its hooks (on the CPU).

    Args:
        block: a teacher block, possibly wrapped by ppcl, accelerate, diffusers hooks or PEFT.
        allow_merged_adapters: accept adapters whose deltas were merged into the base weights. The copy then holds
            the merged weights; only acceptable when they are overwritten right after (loading saved weights).

    Raises:
        ConfigError: an adapter is merged into the base weights and ``allow_merged_adapters`` is false.
    """
    # The memo leaves hooks and the dispatcher (which reaches the whole model) behind, and makes the copy hold GGUF
    # weights dequantised (they cannot be deep-copied).
    memo = _hookless_memo(block) | dispatch.detached_copy_memo(block) | gguf_copy_memo(block)
    clone = copy.deepcopy(block, memo)
    materialise_(clone, block)  # weights accelerate's sequential offload keeps in its hooks, not on the block
    for module in clone.modules():
        module.__dict__.pop(dispatch.COMPILE_ATTR, None)  # a copy is not compiled (uninstall would compile it)
        dispatch.uninstall(module)  # a copy of a dispatched block is a plain block of the diffusers class
    for name, module in list(clone.named_modules()):
        if not is_adapter_layer(module):
            continue
        if getattr(module, "merged", False) and not allow_merged_adapters:
            raise ConfigError(
                f"The adapter on `{name}` is merged into the teacher's weights",
                expected="a teacher block with unmerged adapters (or none)",
                found=f"{type(module).__name__} with merged=True",
                fix="unmerge the adapter (model.unmerge_adapter / unfuse_lora) before creating the add-on",
            )
        replace_submodule(clone, name, module.get_base_layer())
    for module in clone.modules():
        for attr in _INSTANCE_HOOK_ATTRS:
            module.__dict__.pop(attr, None)
        for hooks in _HOOK_DICTS:
            table = module.__dict__.get(hooks)
            if table is not None:
                table.clear()
    for param in clone.parameters():
        param.grad = None
    _to_compute_dtypes(block, clone)
    # A quantised teacher (torchao / bitsandbytes / GGUF weights) runs as it is; the copy is trained, so it holds
    # plain floats.
    return dequantize_(clone)


def _hookless_memo(block: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that copies ``block``'s hook objects as nothing (they may hold what cannot be copied,
    e.g. diffusers' layerwise-casting hooks) and each hook table as a fresh empty one."""
    memo: dict[int, Any] = {}
    for module in block.modules():
        for attr in _INSTANCE_HOOK_ATTRS:
            value = module.__dict__.get(attr)
            if value is not None:
                memo[id(value)] = None
        for hooks in _HOOK_DICTS:
            table = module.__dict__.get(hooks)
            if table is not None:
                memo[id(table)] = type(table)()
    return memo


def _to_compute_dtypes(block: nn.Module, clone: nn.Module) -> None:
    """Cast submodules the teacher stores in a low-precision format and upcasts on the fly (diffusers' layerwise
    casting: fp8 storage, bf16/fp32 compute) to their compute dtype: a student trains in full precision."""
    copies = dict(clone.named_modules())  # adapter layers are gone from the clone: match by name
    for name, module in block.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        hook = registry.get_hook(LAYERWISE_CASTING_HOOK) if registry is not None else None
        dtype = getattr(hook, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and name in copies:
            copies[name].to(dtype)


def averaged_block_copy(blocks: list[nn.Module]) -> nn.Module:
    """A plain copy of ``blocks[0]`` whose every floating-point parameter and buffer is the mean over ``blocks``.

    The blocks must share one structure (blocks of one stack do). Means are summed in float32 one block at a time
    (one extra block copy in memory, whatever the span's length) and cast back, so a bf16 base does not lose the
    average to rounding. Used for the ``average`` student initialisation.

    Raises:
        ConfigError: the blocks differ in parameter names or shapes.
    """
    clone = plain_block_copy(blocks[0])
    target = {k: v for k, v in clone.state_dict().items() if v.is_floating_point()}
    sums = {k: v.float().clone() for k, v in target.items()}
    for block in blocks[1:]:
        state = plain_block_copy(block).state_dict()  # adapters stripped, as in the clone
        for name, total in sums.items():
            other = state.get(name)
            if other is None or other.shape != total.shape:
                raise ConfigError(
                    "cannot average blocks of different structure",
                    expected="blocks of one stack",
                    found=f"parameter {name!r} missing or of another shape in some block",
                    fix="use init 'first', 'middle' or 'last' for this span",
                )
            total.add_(other.float())
        del state
    with torch.no_grad():
        for name, value in target.items():
            value.copy_((sums[name] / len(blocks)).to(value.dtype))
    return clone


def base_named_shapes(block: nn.Module) -> dict[str, list[int]]:
    """``{parameter name: shape}`` of ``block`` as the bare diffusers block names them (adapter params left out).

    ``attn.to_q.base_layer.weight`` of a LoRA-wrapped block is reported as ``attn.to_q.weight``, so a base model with a
    LoRA has the same fingerprint as without.
    """
    prefixes = sorted((n for n, m in block.named_modules() if is_adapter_layer(m)), key=len, reverse=True)
    shapes: dict[str, list[int]] = {}
    for name, param in block.named_parameters():
        plain = _plain_name(name, prefixes)
        if plain is not None:
            shapes[plain] = logical_shape(param)  # 4-bit weights are stored packed: their own shape says nothing
    return dict(sorted(shapes.items()))


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's own state dict (parameters and persistent buffers), detached."""
    return {k: v.detach() for k, v in block.state_dict().items()}


def _plain_name(name: str, adapter_prefixes: list[str]) -> str | None:
    for prefix in adapter_prefixes:
        head = f"{prefix}." if prefix else ""
        if not name.startswith(head):
            continue
        rest = name[len(head) :]
        # Only what sits under base_layer is the original layer; everything else belongs to the adapter.
        if rest.startswith("base_layer."):
            return head + rest[len("base_layer.") :]
        return None
    return name
