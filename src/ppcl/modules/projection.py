"""Residual linear projections of width pruning: ``L(z) = z + z Wᵀ + b`` (METHOD.md Stage 2).

They are :class:`~ppcl.analysis.probes.ResidualProbe` maps (same parameters ``W`` ``(D, D)`` and ``b`` ``(D,)``, same
mixed-precision forward), with initialisation hooks: :meth:`ResidualLinear.fit_from` solves the least squares of a
:class:`~ppcl.analysis.probes.ProbeAccumulator` (the calibration-set statistics) in place, :meth:`ResidualLinear.set_map`
takes ``W, b`` directly. A fresh projection is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppcl.analysis.probes import ProbeAccumulator, ResidualProbe
from ppcl.errors import ConfigError


class ResidualLinear(ResidualProbe):
    """``z ↦ z + z Wᵀ + b`` on ``(..., D)`` tokens; parameters ``W`` ``(D, D)``, ``b`` ``(D,)`` (zero = identity)."""

    def __init__(
        self, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        super().__init__(dim, dim, residual=True, dtype=dtype, device=device)

    def set_map(self, W: Tensor, b: Tensor) -> ResidualLinear:
        """Copy ``W`` ``(D, D)`` and ``b`` ``(D,)`` into the parameters in place (optimisers stay valid); returns self."""
        if tuple(W.shape) != (self.dim, self.dim) or tuple(b.shape) != (self.dim,):
            raise ConfigError(
                "Projection weights have the wrong shape",
                expected=f"W ({self.dim}, {self.dim}), b ({self.dim},)",
                found=f"W {tuple(W.shape)}, b {tuple(b.shape)}",
            )
        with torch.no_grad():
            self.W.copy_(W)
            self.b.copy_(b)
        return self

    def fit_from(self, accumulator: ProbeAccumulator, ridge: float = 1e-4) -> float:
        """Least-squares initialisation from accumulated ``(input, target)`` token statistics, in place.

        ``accumulator`` must be a residual accumulator of width ``D`` fed with the projection's input and the teacher
        tensor it should reproduce (e.g. ``z_a`` and block ``j``'s modulated text features).

        Returns:
            the relative fit error of the solution over the accumulated tokens.
        """
        if not accumulator.residual or accumulator.dim != self.dim:
            raise ConfigError(
                "The accumulator does not fit this projection",
                expected=f"a residual ProbeAccumulator of width {self.dim}",
                found=f"residual={accumulator.residual}, dim={accumulator.dim}",
                fix="accumulate with ProbeAccumulator(dim, residual=True)",
            )
        fit = accumulator.fit(ridge, dtype=torch.float64)
        self.set_map(fit.probe.W.to(self.W.dtype), fit.probe.b.to(self.b.dtype))
        return fit.rel_error
