"""Forward FLOPs of one transformer call, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_flops(model: nn.Module, batch: dict[str, Any]) -> int:
    """FLOPs of ``model(**batch)`` (a multiply-add counts as 2), whatever level is active."""
    with FlopCounterMode(display=False) as counter:
        model(**batch, return_dict=False)
    return int(counter.get_total_flops())
