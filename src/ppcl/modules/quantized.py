"""Quantised teacher weights made full precision again, for students (recognising them: :mod:`ppcl.storage`).

A frozen teacher may be loaded with torchao (int8 / fp8 weight-only: each ``nn.Linear.weight`` becomes a
``TorchAOBaseTensor`` subclass) or bitsandbytes (``Linear8bitLt`` / ``Linear4bit`` modules with ``Int8Params`` /
``Params4bit`` weights, 4-bit ones packed into a ``(n/2, 1)`` uint8 tensor), or come from a GGUF file through diffusers
(``from_single_file`` with ``GGUFQuantizationConfig``: ``GGUFLinear`` modules whose ``GGUFParameter`` weights are the
file's raw block bytes). The teacher runs as it is; a student,
which is trained, must not be quantised: :func:`dequantize_` turns a copied block back into plain modules with
float weights (the quantised values, dequantised: the student starts exactly from the teacher it will be compared
with). No quantisation library is imported unless such a weight is present.
"""

from __future__ import annotations

import torch
from torch import nn

from ppcl.storage import is_gguf_param, is_quantized_tensor

_BNB_LINEARS = ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")
_GGUF_LINEAR = "GGUFLinear"


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
        layer_dtype = dtype or getattr(child, "compute_dtype", None) or fallback
        if type(child).__name__ in _BNB_LINEARS and type(child).__module__.startswith("bitsandbytes"):
            replace_submodule(module, name, _bnb_to_linear(child, layer_dtype))
        elif _is_gguf_linear(child):
            replace_submodule(module, name, _gguf_to_linear(child, layer_dtype))
    for child in module.modules():
        layer_dtype = dtype or getattr(child, "compute_dtype", None) or fallback
        for key, param in list(child._parameters.items()):
            if param is not None and is_gguf_param(param):
                plain = dequantize_gguf(param, layer_dtype)
                child._parameters[key] = nn.Parameter(plain, requires_grad=param.requires_grad)
            elif param is not None and is_quantized_tensor(param):
                plain = param.data.dequantize()
                child._parameters[key] = nn.Parameter(plain.to(dtype or plain.dtype), requires_grad=param.requires_grad)
    return module


def gguf_copy_memo(module: nn.Module, dtype: torch.dtype | None = None) -> dict[int, nn.Parameter]:
    """A ``copy.deepcopy`` memo under which a copy of ``module`` holds its GGUF weights dequantised.

    diffusers' ``GGUFParameter`` cannot be deep-copied (the copy loses its quantisation type and fails), so a block
    holding them is copied with this memo: each GGUF weight's copy is a plain float ``nn.Parameter`` in the compute
    dtype of the ``GGUFLinear`` that owns it (``dtype`` when given). :func:`dequantize_` then turns the copied
    ``GGUFLinear`` modules into ``nn.Linear``. Empty when ``module`` has no GGUF weight.
    """
    memo: dict[int, nn.Parameter] = {}
    fallback = dtype or _plain_float_dtype(module)
    for child in module.modules():
        layer_dtype = dtype or getattr(child, "compute_dtype", None) or fallback
        for param in child._parameters.values():
            if param is not None and is_gguf_param(param) and id(param) not in memo:
                memo[id(param)] = nn.Parameter(dequantize_gguf(param, layer_dtype), requires_grad=False)
    return memo


def dequantize_gguf(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float values of a ``GGUFParameter``, ``(out, in)`` in ``dtype`` (diffusers' own dequantisation)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    with torch.no_grad():
        return dequantize_gguf_tensor(param).to(dtype).clone()  # a plain tensor, never a view of the file's bytes


def _is_gguf_linear(module: nn.Module) -> bool:
    return type(module).__name__ == _GGUF_LINEAR and type(module).__module__.startswith("diffusers.quantizers.gguf")


def _gguf_to_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = layer.weight
    if is_gguf_param(weight):
        return _linear_from(dequantize_gguf(weight, dtype), layer.bias, dtype, training=layer.training)
    # Copied under gguf_copy_memo: a plain parameter already, which a tied layer may share: keep the object.
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    linear.weight = weight if weight.dtype == dtype else nn.Parameter(weight.detach().to(dtype), weight.requires_grad)
    linear.bias = layer.bias
    return linear.train(layer.training)


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
    return _linear_from(plain, layer.bias, dtype, training=layer.training)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, training: bool) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` in ``dtype``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.detach().to(dtype))
    return linear.train(training)


def replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Set ``root``'s submodule at the dotted path ``dotted`` (non-empty) to ``new``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
