"""How a model's weights are stored, read without changing anything: quantised tensors (torchao, bitsandbytes, GGUF),
their logical shapes, and the dtype a model computes in (diffusers' layerwise casting stores weights in fp8).

No quantisation library is imported here: their tensors are recognised by their types' module names.
"""

from __future__ import annotations

import torch
from torch import nn

_LAYERWISE_CASTING_HOOK = "layerwise_casting"  # diffusers' name of the hook enable_layerwise_casting registers
_FP8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds quantised values: a torchao tensor subclass, bitsandbytes int8 / 4-bit params, or
    diffusers' GGUF parameters."""
    if is_gguf_param(tensor):
        return True
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    kind = type(data).__module__ + "." + type(data).__name__
    return kind.startswith("torchao.") or is_bnb_param(tensor)


def is_gguf_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is diffusers' ``GGUFParameter``: the raw bytes of GGUF blocks (``Q8_0``, ``Q4_K``, ...),
    ``(out, in / block · bytes per block)`` uint8, dequantised by ``GGUFLinear`` in every forward."""
    return type(tensor).__name__ == "GGUFParameter" and type(tensor).__module__.startswith("diffusers.quantizers.gguf")


def is_bnb_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a bitsandbytes ``Int8Params`` / ``Params4bit``."""
    return type(tensor).__module__.startswith("bitsandbytes") and type(tensor).__name__ in ("Int8Params", "Params4bit")


def has_quantized_weights(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is quantised (see :func:`is_quantized_tensor`)."""
    return any(is_quantized_tensor(p) for p in module.parameters())


def logical_shape(param: torch.Tensor) -> list[int]:
    """The shape the unquantised weight has (4-bit bitsandbytes and GGUF weights are stored packed)."""
    if is_gguf_param(param):
        return list(param.quant_shape)
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return list(state.shape)
    return list(param.shape)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in, which is what its inputs must have: the compute dtype of diffusers' layerwise
    casting when it is on (the parameters are stored in fp8), else the dtype of the first plain floating-point
    parameter (quantised and fp8-stored ones say nothing: 4-bit weights are uint8), else float32."""
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        dtype = getattr(hook, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    for param in model.parameters():
        if param.is_floating_point() and param.dtype not in _FP8 and not is_quantized_tensor(param):
            return param.dtype
    return torch.float32
