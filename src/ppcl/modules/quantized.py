"""Quantised teacher weights made full precision again, for students (recognising them: :mod:`ppcl.storage`).

A frozen teacher may be loaded with torchao (int8 / fp8 weight-only: each ``nn.Linear.weight`` becomes a
``TorchAOBaseTensor`` subclass) or bitsandbytes (``Linear8bitLt`` / ``Linear4bit`` modules with ``Int8Params`` /
``Params4bit`` weights, 4-bit ones packed into a ``(n/2, 1)`` uint8 tensor). The teacher runs as it is; a student,
which is trained, must not be quantised: :func:`dequantize_` turns a copied block back into plain modules with
float weights (the quantised values, dequantised: the student starts exactly from the teacher it will be compared
with). Neither library is imported unless such a weight is present.
"""

from __future__ import annotations

import torch
from torch import nn

from ppcl.storage import is_quantized_tensor

_BNB_LINEARS = ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")


def dequantize_(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantised weight in ``module`` (in place) by a plain float ``nn.Parameter`` / ``nn.Linear``.

    Args:
        module: e.g. a copy of a teacher block.
        dtype: the float dtype of dequantised weights; ``None``: the dtype torchao records, or the module's compute
            dtype (bitsandbytes), else the dtype of the module's other floating-point parameters, else float32.

    Returns:
        ``module``.
    """
    fallback = dtype or _plain_float_dtype(module)
    for name, child in list(module.named_modules()):
        if type(child).__name__ in _BNB_LINEARS and type(child).__module__.startswith("bitsandbytes"):
            replace_submodule(
                module, name, _bnb_to_linear(child, dtype or getattr(child, "compute_dtype", None) or fallback)
            )
    for child in module.modules():
        for key, param in list(child._parameters.items()):
            if param is not None and is_quantized_tensor(param):
                plain = param.data.dequantize()
                child._parameters[key] = nn.Parameter(plain.to(dtype or plain.dtype), requires_grad=param.requires_grad)
    return module


def _plain_float_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point() and not is_quantized_tensor(param):
            return param.dtype
    return torch.float32


def _bnb_to_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernels at the first eval forward; undo that first.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        plain = dequantize_4bit(data, state)
    elif getattr(weight, "SCB", None) is not None:  # int8 rows with one absmax scale each (LLM.int8 layout)
        plain = weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
    else:  # an 8-bit layer that still holds its float weights (has_fp16_weights=True)
        plain = weight.data
    linear = nn.Linear(plain.shape[1], plain.shape[0], bias=layer.bias is not None, device=plain.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(plain.to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach().to(dtype))
    return linear.train(layer.training)


def replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Set ``root``'s submodule at the dotted path ``dotted`` (non-empty) to ``new``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
