"""What the two width kinds share: residual linear projections keyed under their replacement, at the block's width."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ppcl.kinds.base import Kind, student_key
from ppcl.modules.projection import ResidualLinear

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.plan import Replacement


def width_key(rep: Replacement, part: str) -> str:
    """Key of one projection of ``rep`` in the add-on's ModuleDict; ``part`` is ``"in_<j>"``, ``"out"`` or a stream."""
    return f"{student_key(rep.id)}__{part}"


def block_dim(block: nn.Module) -> int:
    """Token width ``D`` of a dual-stream block (its image query input; text tokens share it)."""
    return int(block.attn.to_q.in_features)


class ProjectionKind(Kind):
    """A width kind: every module is an identity-initialised :class:`ResidualLinear` ``(D, D)`` on the device of the
    replacement's first block."""

    is_width = True

    def fresh_modules(
        self, model: nn.Module, spec: ArchSpec, rep: Replacement, dtype: torch.dtype = torch.float32
    ) -> dict[str, nn.Module]:
        """Identity projections (``W = 0``, ``b = 0``) for every key of ``rep``."""
        block = spec.block(model, rep.blocks()[0])
        device = next(block.parameters()).device
        return {key: ResidualLinear(block_dim(block), dtype=dtype, device=device) for key in self.module_keys(rep)}

    def check_support(self, spec: ArchSpec, model: nn.Module, rep: Replacement) -> None:
        """Every block of ``rep`` must be a block class :func:`ppcl.modules.width.width_forward` runs."""
        from ppcl.errors import ConfigError
        from ppcl.modules.width import supported_blocks

        for i in rep.blocks():
            name = type(spec.block(model, i)).__name__
            if name not in supported_blocks():
                raise ConfigError(
                    f"Replacement {rep.id} targets a {name}",
                    expected=f"one of {supported_blocks()}",
                    found=f"flat block {i}",
                    fix="keep width replacements on dual-stream blocks",
                )
