"""Residual affine probes: how well a block is replaced by a linear map of its own input (METHOD.md Stage 1.1).

A probe is ``P(z) = z + z Wᵀ + b`` (residual) or ``P(z) = z Wᵀ + b`` (plain, e.g. when input and output widths differ).
It is fitted so that ``P(x) ≈ y`` token by token, where ``x`` is a block's input and ``y`` its output.

:class:`ProbeAccumulator` streams the sufficient statistics of that least-squares problem over any number of token
batches (memory O(D²), independent of the token count), solves it in closed form with a relative ridge, and evaluates
the fit error of *any* probe of the same shape exactly from the statistics, without a second pass over the data.
:func:`ppcl.analysis.probe_refine.refine_probe` optionally improves a probe with Adam on cached tokens.

Notation used below: ``a = [x, 1]`` is the input with a bias column, ``t`` the *target* of the linear part: ``y − x``
for a residual probe, ``y`` for a plain one, and ``Θ = [Wᵀ; bᵀ]`` of shape ``(D + 1, D_out)``, so ``P(x) − y = aΘ − t``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ppcl.errors import ConfigError, PPCLError

__all__ = ["ProbeAccumulator", "ProbeFit", "ResidualProbe"]


class ResidualProbe(nn.Module):
    """The affine map ``P(z) = z + z Wᵀ + b`` (``residual=True``) or ``P(z) = z Wᵀ + b``.

    Args:
        dim: input width ``D``.
        out_dim: output width ``D_out`` (default ``D``); a residual probe needs ``D_out == D``.
        residual: add the input to the output.
        dtype, device: of the parameters (float32 by default). ``.to()`` works as for any module.

    Parameters (the ``state_dict`` keys): ``W`` ``(D_out, D)`` and ``b`` ``(D_out,)``, both zero at construction, so a
    fresh residual probe is the identity.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        *,
        residual: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        _check_dims(dim, out_dim, residual)
        self.dim = dim
        self.out_dim = out_dim
        self.residual = residual
        self.W = nn.Parameter(torch.zeros(out_dim, dim, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.zeros(out_dim, dtype=dtype, device=device))

    @classmethod
    def from_tensors(
        cls, W: Tensor, b: Tensor, *, residual: bool = True, dtype: torch.dtype | None = torch.float32
    ) -> ResidualProbe:
        """Build a probe holding copies of ``W`` ``(D_out, D)`` and ``b`` ``(D_out,)``.

        ``dtype=None`` keeps ``W``'s dtype (e.g. float64 for exact comparisons in tests).
        """
        if W.dim() != 2 or b.shape != (W.shape[0],):
            raise PPCLError(
                "Probe weights have inconsistent shapes",
                expected="W of shape (D_out, D) and b of shape (D_out,)",
                found=f"W {tuple(W.shape)}, b {tuple(b.shape)}",
            )
        dtype = W.dtype if dtype is None else dtype
        probe = cls(W.shape[1], W.shape[0], residual=residual, dtype=dtype, device=W.device)
        with torch.no_grad():
            probe.W.copy_(W)
            probe.b.copy_(b)
        return probe

    def forward(self, z: Tensor) -> Tensor:
        """Apply the probe to ``z`` ``(..., D)``; returns ``(..., D_out)`` in ``z``'s dtype.

        The product runs in the wider of ``z``'s and the parameters' dtypes, so float32 probes on bf16 activations
        do not lose precision inside the map; also under autocast (distillation on a bf16 base autocasts each step),
        so a projection trains with the arithmetic it has at inference.
        """
        compute = torch.promote_types(z.dtype, self.W.dtype)
        with _without_autocast(z.device.type):
            zc = z.to(compute)
            out = zc @ self.W.to(compute).T + self.b.to(compute)
            if self.residual:
                out = out + zc
        return out.to(z.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim}, residual={self.residual}"


def _without_autocast(device_type: str) -> AbstractContextManager[object]:
    """Autocast switched off for ``device_type`` when it is on; otherwise nothing (no context cost, and device types
    autocast does not know, such as ``meta``, are never asked)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


@dataclass(frozen=True)
class ProbeFit:
    """A probe and its fit error over the accumulated tokens.

    Attributes:
        probe: the fitted (or evaluated) probe.
        rel_error: ``‖P(x) − y‖_F / ‖t‖_F`` over all tokens and channels, with ``t = y − x`` for a residual probe
            (the error relative to what the block adds) and ``t = y`` for a plain one. NaN when ``‖t‖ = 0``.
        mse: ``‖P(x) − y‖²_F / (n_tokens · D_out)``, the mean squared error per element.
        n_tokens: how many tokens the statistics hold.
    """

    probe: ResidualProbe
    rel_error: float
    mse: float
    n_tokens: int


class ProbeAccumulator:
    """Streaming closed-form least squares for one probe.

    Args:
        dim: input width ``D``.
        out_dim: output width ``D_out`` (default ``D``).
        residual: fit the residual ``y − x`` (needs ``D_out == D``), else ``y`` itself.
        device: where the float64 statistics live; default the device of the first batch.

    Statistics (all float64): ``Σ xᵀx`` ``(D, D)``, ``Σ x`` ``(D,)``, ``Σ xᵀt`` ``(D, D_out)``, ``Σ t`` ``(D_out,)``,
    ``Σ ‖t‖²`` and ``Σ ‖y‖²`` (scalars), and the token count. Together they are the blocks of ``G = Σ aᵀa`` and
    ``C = Σ aᵀt``, which is all the solve and the exact error evaluation need.
    """

    def __init__(
        self, dim: int, out_dim: int | None = None, *, residual: bool = True, device: torch.device | str | None = None
    ) -> None:
        out_dim = dim if out_dim is None else out_dim
        _check_dims(dim, out_dim, residual)
        self.dim = dim
        self.out_dim = out_dim
        self.residual = residual
        self.device: torch.device | None = None if device is None else torch.device(device)
        self.n_tokens = 0
        self._xx: Tensor | None = None
        self._x_sum: Tensor | None = None
        self._xt: Tensor | None = None
        self._t_sum: Tensor | None = None
        self._tt = 0.0
        self._yy = 0.0

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        f64 = {"dtype": torch.float64, "device": device}
        self._xx = torch.zeros(self.dim, self.dim, **f64)
        self._x_sum = torch.zeros(self.dim, **f64)
        self._xt = torch.zeros(self.dim, self.out_dim, **f64)
        self._t_sum = torch.zeros(self.out_dim, **f64)

    def update(self, x: Tensor, y: Tensor, weight_mask: Tensor | None = None) -> None:
        """Add a batch of tokens.

        Args:
            x: block inputs ``(N, D)`` (or ``(..., D)``: leading dimensions are flattened into tokens).
            y: block outputs ``(N, D_out)`` (same leading shape as ``x``).
            weight_mask: optional boolean ``(N,)`` (or the leading shape); ``False`` tokens (padding) are skipped.
        """
        x2, y2 = _tokens(x, self.dim, "x"), _tokens(y, self.out_dim, "y")
        if x2.shape[0] != y2.shape[0]:
            raise PPCLError(
                "Probe inputs and targets hold different token counts",
                expected=f"x and y with the same leading shape (x has {tuple(x.shape[:-1])})",
                found=f"y with leading shape {tuple(y.shape[:-1])}",
            )
        if self.device is None or self._xx is None:
            self._allocate(self.device or x.device)
        x2 = x2.to(device=self.device, dtype=torch.float64)
        y2 = y2.to(device=self.device, dtype=torch.float64)
        if weight_mask is not None:
            keep = _flat_mask(weight_mask, x2.shape[0]).to(self.device)
            x2, y2 = x2[keep], y2[keep]
        t = y2 - x2 if self.residual else y2
        assert self._xx is not None and self._x_sum is not None and self._xt is not None and self._t_sum is not None
        self._xx += x2.T @ x2
        self._x_sum += x2.sum(0)
        self._xt += x2.T @ t
        self._t_sum += t.sum(0)
        self._tt += float((t * t).sum())
        self._yy += float((y2 * y2).sum())
        self.n_tokens += int(x2.shape[0])

    def merge(self, other: ProbeAccumulator) -> None:
        """Add ``other``'s statistics to these (e.g. partial sums from several processes or shards)."""
        if (other.dim, other.out_dim, other.residual) != (self.dim, self.out_dim, self.residual):
            raise PPCLError(
                "Cannot merge probe statistics of different shapes",
                expected=f"dim={self.dim}, out_dim={self.out_dim}, residual={self.residual}",
                found=f"dim={other.dim}, out_dim={other.out_dim}, residual={other.residual}",
            )
        if other._xx is None:
            return
        if self._xx is None:
            self._allocate(self.device or other._xx.device)
        assert self._xx is not None and self._x_sum is not None and self._xt is not None and self._t_sum is not None
        assert other._x_sum is not None and other._xt is not None and other._t_sum is not None
        self._xx += other._xx.to(self.device)
        self._x_sum += other._x_sum.to(self.device)
        self._xt += other._xt.to(self.device)
        self._t_sum += other._t_sum.to(self.device)
        self._tt += other._tt
        self._yy += other._yy
        self.n_tokens += other.n_tokens

    @property
    def target_sq_norm(self) -> float:
        """``Σ ‖t‖²``: the squared norm of what the probe's linear part must produce (``‖y − x‖²`` when residual)."""
        return self._tt

    @property
    def output_sq_norm(self) -> float:
        """``Σ ‖y‖²`` over the accumulated tokens."""
        return self._yy

    def gram(self) -> tuple[Tensor, Tensor]:
        """``G = Σ aᵀa`` ``(D + 1, D + 1)`` and ``C = Σ aᵀt`` ``(D + 1, D_out)`` with ``a = [x, 1]`` (float64)."""
        self._require_data()
        assert self._xx is not None and self._x_sum is not None and self._xt is not None and self._t_sum is not None
        d = self.dim
        G = torch.empty(d + 1, d + 1, dtype=torch.float64, device=self.device)
        G[:d, :d] = self._xx
        G[:d, d] = self._x_sum
        G[d, :d] = self._x_sum
        G[d, d] = float(self.n_tokens)
        C = torch.cat([self._xt, self._t_sum[None]], dim=0)
        return G, C

    def solve(self, ridge: float = 1e-4, *, dtype: torch.dtype = torch.float32) -> ResidualProbe:
        """The least-squares probe, ``Θ = (G + λ diag(I_D, 0))⁻¹ C`` with ``λ = ridge · trace(Σ xᵀx) / D``.

        The ridge is relative to the mean channel energy, so one value suits activations of any scale; the bias is not
        penalised. With ``ridge > 0`` the system is positive definite even with fewer tokens than channels.
        """
        if ridge < 0:
            raise ConfigError("The probe ridge is negative", expected="ridge >= 0", found=str(ridge))
        G, C = self.gram()
        d = self.dim
        lam = ridge * float(torch.diagonal(G)[:d].sum()) / d
        if ridge > 0 and lam == 0.0:
            # All-zero inputs: any W fits; a unit ridge keeps the solve well posed and gives W = 0.
            lam = ridge
        G[range(d), range(d)] += lam
        theta = _spd_solve(G, C)
        return ResidualProbe.from_tensors(theta[:d].T, theta[d], residual=self.residual, dtype=dtype)

    def fit(self, ridge: float = 1e-4, *, dtype: torch.dtype = torch.float32) -> ProbeFit:
        """:meth:`solve`, then :meth:`fit_error` of the solution (the error of the float64 solution, not its cast)."""
        probe64 = self.solve(ridge, dtype=torch.float64)
        fit = self.fit_error(probe64)
        return ProbeFit(probe64.to(dtype), fit.rel_error, fit.mse, fit.n_tokens)

    def fit_error(self, probe: ResidualProbe) -> ProbeFit:
        """The exact fit error of ``probe`` on the accumulated tokens, from the statistics alone.

        ``Σ ‖aΘ − t‖² = tr(Θᵀ G Θ) − 2 tr(Θᵀ C) + Σ ‖t‖²``, evaluated in float64. A residual probe must be evaluated
        on residual statistics and vice versa.
        """
        if (probe.dim, probe.out_dim, probe.residual) != (self.dim, self.out_dim, self.residual):
            raise PPCLError(
                "The probe does not match these statistics",
                expected=f"a probe with dim={self.dim}, out_dim={self.out_dim}, residual={self.residual}",
                found=f"dim={probe.dim}, out_dim={probe.out_dim}, residual={probe.residual}",
            )
        G, C = self.gram()
        with torch.no_grad():
            theta = torch.cat([probe.W.T, probe.b[None]], dim=0).to(device=self.device, dtype=torch.float64)
        sq = float((theta * (G @ theta)).sum() - 2.0 * (theta * C).sum()) + self._tt
        # The expansion can dip a few ulps below zero for an exact fit.
        sq = max(sq, 0.0)
        rel = (sq / self._tt) ** 0.5 if self._tt > 0 else float("nan")
        return ProbeFit(probe, rel, sq / (self.n_tokens * self.out_dim), self.n_tokens)

    def _require_data(self) -> None:
        if self.n_tokens == 0:
            raise PPCLError(
                "No tokens were accumulated for this probe",
                expected="at least one update() with unmasked tokens",
                found="0 tokens",
                fix="check the calibration data and the token mask",
            )


def _spd_solve(G: Tensor, C: Tensor) -> Tensor:
    """Solve ``G Θ = C`` for symmetric positive (semi)definite ``G``: Cholesky, else the minimum-norm least squares."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(C, L)
    # Singular only when ridge = 0 and the inputs do not span their space; the pseudo-inverse gives the smallest Θ.
    return torch.linalg.pinv(G, hermitian=True) @ C


def _tokens(t: Tensor, width: int, name: str) -> Tensor:
    """Flatten ``(..., width)`` to ``(N, width)``."""
    if t.dim() < 1 or t.shape[-1] != width:
        raise PPCLError(
            f"The probe's {name} has the wrong width",
            expected=f"a tensor of shape (..., {width})",
            found=f"shape {tuple(t.shape)}",
        )
    return t.reshape(-1, width)


def _flat_mask(mask: Tensor, n: int) -> Tensor:
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool or flat.shape[0] != n:
        raise PPCLError(
            "The token mask does not match the tokens",
            expected=f"a boolean mask with {n} elements (one per token)",
            found=f"dtype {mask.dtype}, shape {tuple(mask.shape)}",
        )
    return flat


def _check_dims(dim: int, out_dim: int, residual: bool) -> None:
    if dim < 1 or out_dim < 1:
        raise ConfigError("Probe widths must be positive", expected="dim, out_dim >= 1", found=f"{dim}, {out_dim}")
    if residual and dim != out_dim:
        raise PPCLError(
            "A residual probe needs equal input and output widths",
            expected=f"out_dim == dim ({dim})",
            found=f"out_dim = {out_dim}",
            fix="pass residual=False to fit a plain affine map between different widths",
        )
