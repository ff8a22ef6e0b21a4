"""Forward FLOPs of one transformer call, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_flops(model: nn.Module, batch: dict[str, Any]) -> int:
    """FLOPs of ``model(**batch)`` (a multiply-add counts as 2), whatever level is active.

    Attention runs on its math path while counting: FlopCounterMode has no formula for the CPU flash-attention kernel
    and would count attention as zero (about 9% of the toy teacher's FLOPs). The math path is the same arithmetic
    spelled as matmuls, so every backend gets the same count.
    """
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(**batch, return_dict=False)
    return int(counter.get_total_flops())
