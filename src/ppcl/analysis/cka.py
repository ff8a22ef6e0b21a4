"""Linear CKA between token features, and the probe-chain CKA trajectories of METHOD.md Stage 1.2.

Rows are tokens, columns channels. With column-centred ``X`` ``(N, Dx)`` and ``Y`` ``(N, Dy)``::

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)

It is 1 for identical features, invariant to orthogonal maps, isotropic scaling and translation of either side, but
not to general linear maps. All values are computed in float64. ``‖YᵀX‖²_F = ⟨XXᵀ, YYᵀ⟩`` as well, so whichever of
the feature form (``D × D`` products) and the token form (``N × N`` Grams) is cheaper is used; both are the same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ppcl.errors import PPCLError

__all__ = ["CKAAccumulator", "cka_matrix", "cka_trajectories", "linear_cka"]

Probe = Callable[[Tensor], Tensor]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between ``x`` ``(N, Dx)`` and ``y`` ``(N, Dy)`` (rows = tokens); NaN if either side is constant."""
    _check_pair(x, y)
    return _cka_centred(_centre(x), _centre(y))


class CKAAccumulator:
    """Linear CKA streamed over token batches.

    Args:
        dx, dy: feature widths of the two sides.
        device: where the float64 statistics live; default the device of the first batch.

    Accumulates ``XᵀX`` ``(Dx, Dx)``, ``YᵀY`` ``(Dy, Dy)``, ``XᵀY`` ``(Dx, Dy)``, the column sums and the token count
    in float64, and centres algebraically at the end (``XᵀX − n μxμxᵀ`` and so on), so :meth:`value` equals
    :func:`linear_cka` on the concatenated batches.
    """

    def __init__(self, dx: int, dy: int, *, device: torch.device | str | None = None) -> None:
        self.dx, self.dy = dx, dy
        self.device: torch.device | None = None if device is None else torch.device(device)
        self.n_tokens = 0
        self._xx: Tensor | None = None
        self._yy: Tensor | None = None
        self._xy: Tensor | None = None
        self._sx: Tensor | None = None
        self._sy: Tensor | None = None

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        f64 = {"dtype": torch.float64, "device": device}
        self._xx = torch.zeros(self.dx, self.dx, **f64)
        self._yy = torch.zeros(self.dy, self.dy, **f64)
        self._xy = torch.zeros(self.dx, self.dy, **f64)
        self._sx = torch.zeros(self.dx, **f64)
        self._sy = torch.zeros(self.dy, **f64)

    def update(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> None:
        """Add tokens: ``x`` ``(N, Dx)``, ``y`` ``(N, Dy)``, optional boolean ``mask`` ``(N,)`` (False = skip)."""
        _check_pair(x, y)
        if x.shape[1] != self.dx or y.shape[1] != self.dy:
            raise PPCLError(
                "CKA features have the wrong width",
                expected=f"x (N, {self.dx}) and y (N, {self.dy})",
                found=f"x {tuple(x.shape)}, y {tuple(y.shape)}",
            )
        if self._xx is None:
            self._allocate(self.device or x.device)
        x = x.to(device=self.device, dtype=torch.float64)
        y = y.to(device=self.device, dtype=torch.float64)
        if mask is not None:
            keep = mask.reshape(-1).to(device=self.device, dtype=torch.bool)
            x, y = x[keep], y[keep]
        assert self._yy is not None and self._xy is not None and self._sx is not None and self._sy is not None
        self._xx += x.T @ x
        self._yy += y.T @ y
        self._xy += x.T @ y
        self._sx += x.sum(0)
        self._sy += y.sum(0)
        self.n_tokens += int(x.shape[0])

    def merge(self, other: CKAAccumulator) -> None:
        """Add ``other``'s statistics (same widths) to these."""
        if (other.dx, other.dy) != (self.dx, self.dy):
            raise PPCLError(
                "Cannot merge CKA statistics of different widths",
                expected=f"({self.dx}, {self.dy})",
                found=f"({other.dx}, {other.dy})",
            )
        if other._xx is None:
            return
        if self._xx is None:
            self._allocate(self.device or other._xx.device)
        for name in ("_xx", "_yy", "_xy", "_sx", "_sy"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.n_tokens += other.n_tokens

    def value(self) -> float:
        """CKA of all accumulated tokens; NaN if a side is constant, :class:`PPCLError` if there are no tokens."""
        if self.n_tokens == 0 or self._xx is None:
            raise PPCLError("No tokens were accumulated for CKA", expected="at least one unmasked token", found="0")
        assert self._yy is not None and self._xy is not None and self._sx is not None and self._sy is not None
        n = float(self.n_tokens)
        xx = self._xx - torch.outer(self._sx, self._sx) / n
        yy = self._yy - torch.outer(self._sy, self._sy) / n
        xy = self._xy - torch.outer(self._sx, self._sy) / n
        return _ratio(float(xy.pow(2).sum()), float(xx.norm()), float(yy.norm()))


def cka_matrix(features: Sequence[Tensor]) -> Tensor:
    """Pairwise CKA across ``L`` feature sets, e.g. the text stream across depth.

    Args:
        features: ``L`` tensors ``(N, D_i)`` over the same ``N`` tokens (widths may differ).

    Returns:
        ``(L, L)`` float64, symmetric, diagonal 1 (NaN rows/columns for constant features).

    Column means and self-norms are computed once per set. With ``N`` below the widths the centred ``N × N`` Grams
    are formed once and compared by inner products; otherwise each pair is centred in float64 on the fly, so the
    extra memory is two sets, not ``L`` float64 copies.
    """
    if not features:
        return torch.zeros(0, 0, dtype=torch.float64)
    n = features[0].shape[0]
    for f in features:
        if f.dim() != 2 or f.shape[0] != n:
            raise PPCLError(
                "CKA features must share their token count",
                expected=f"2-D tensors (N={n}, D_i)",
                found=f"shape {tuple(f.shape)}",
            )
    L = len(features)
    out = torch.empty(L, L, dtype=torch.float64)
    if n < max(f.shape[1] for f in features):
        grams = torch.stack([_gram(_centre(f)) for f in features]).reshape(L, -1)
        inner = (grams @ grams.T).cpu()
        norms = inner.diagonal().sqrt()
        out = inner / (norms[:, None] * norms[None, :])
    else:
        means = [_mean(f) for f in features]
        self_norms = [_self_norm(_centre(f, m)) for f, m in zip(features, means, strict=False)]
        for i in range(L):
            ci = _centre(features[i], means[i])
            for j in range(i, L):
                cross = float((_centre(features[j], means[j]).T @ ci).pow(2).sum())
                out[i, j] = out[j, i] = _ratio(cross, self_norms[i], self_norms[j])
    defined = torch.nonzero(torch.isfinite(out.diagonal())).flatten()
    out[defined, defined] = 1.0
    return out


def cka_trajectories(
    outputs: Sequence[Tensor],
    probes: Sequence[Probe | None],
    max_len: int,
    token_index: Tensor | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """``cka(u, k) = CKA(x_k, z_{u,k})`` with ``z_{u,k} = P_k(…P_{u+1}(x_u))``: keep block ``u``, linearise ``u+1..k``.

    Args:
        outputs: ``L`` cached block outputs ``x_i`` ``(N, D)``, ``i = 0..L−1``, over the same (aligned) tokens.
        probes: ``L`` probes; ``probes[i]`` maps block ``i``'s input to its output (``probes[0]`` is never used and
            may be None). Any callable ``(N, D) -> (N, D)``, e.g. a :class:`~ppcl.analysis.probes.ResidualProbe`.
        max_len: compute ``u < k ≤ min(L − 1, u + max_len)``. Interval scans with a length bound of ``m`` blocks
            need ``max_len ≥ m − 1``.
        token_index: optional ``(M,)`` row indices applied to every output (token subsampling).
        progress: called as ``progress(u, L)`` after each start ``u``.

    Returns:
        ``(L, L)`` float64: 1 on the diagonal, ``cka(u, k)`` for ``u < k ≤ u + max_len``, NaN elsewhere.

    Each start chains one probe per step on the previous proxy (no prefix is recomputed). Chaining runs in float32
    on the outputs' device, CKA in float64; everything is token-wise, so subsampled tokens give the same proxies.
    """
    L = len(outputs)
    if len(probes) != L:
        raise PPCLError(
            "Need one probe per block output",
            expected=f"{L} probes (probes[i] maps block i's input to its output)",
            found=f"{len(probes)} probes",
        )
    if max_len < 1:
        raise PPCLError("The trajectory length must be positive", expected="max_len >= 1", found=str(max_len))
    xs = [x if token_index is None else x[token_index] for x in outputs]
    for x in xs:
        if x.dim() != 2 or x.shape != xs[0].shape:
            raise PPCLError(
                "Cached block outputs must all have the same (tokens, channels) shape",
                expected=f"2-D tensors of shape {tuple(xs[0].shape)}",
                found=f"shape {tuple(x.shape)}",
            )
    for k in range(1, L):
        if probes[k] is None:
            raise PPCLError(f"Probe {k} is missing", expected="a probe for every block after the first", found="None")
    out = torch.full((L, L), math.nan, dtype=torch.float64)
    out.fill_diagonal_(1.0)
    # Every start reuses the targets: their means and self-norms (the O(N·D²) part) are computed once; centring
    # (O(N·D)) is redone per pair so that no float64 copy of all L outputs is ever held.
    means = [_mean(x) for x in xs]
    target_norms = [_self_norm(_centre(x, m)) for x, m in zip(xs, means, strict=False)]
    with torch.no_grad():
        for u in range(L - 1):
            z = xs[u].to(torch.float32)
            for k in range(u + 1, min(L - 1, u + max_len) + 1):
                probe = probes[k]
                assert probe is not None
                z = probe(z).to(torch.float32)
                zc = _centre(z)
                out[u, k] = _cka_centred(_centre(xs[k], means[k]), zc, target_norms[k], _self_norm(zc))
            if progress is not None:
                progress(u, L)
    return out


def _mean(x: Tensor) -> Tensor:
    """Float64 column means ``(1, D)`` of ``x`` ``(N, D)``."""
    return x.to(torch.float64).mean(0, keepdim=True)


def _centre(x: Tensor, mean: Tensor | None = None) -> Tensor:
    """Float64 copy of ``x`` ``(N, D)`` minus its column means (``mean`` when already known)."""
    x = x.to(torch.float64)
    return x - (x.mean(0, keepdim=True) if mean is None else mean)


def _gram(c: Tensor) -> Tensor:
    """Token Gram ``C Cᵀ`` ``(N, N)``."""
    return c @ c.T


def _self_norm(c: Tensor) -> float:
    """``‖CᵀC‖_F`` of centred ``c`` ``(N, D)``, via the smaller of ``CᵀC`` and ``CCᵀ`` (same Frobenius norm)."""
    return float((c.T @ c).norm() if c.shape[0] >= c.shape[1] else _gram(c).norm())


def _cka_centred(xc: Tensor, yc: Tensor, x_norm: float | None = None, y_norm: float | None = None) -> float:
    """CKA of already-centred float64 ``xc`` ``(N, Dx)`` and ``yc`` ``(N, Dy)``."""
    n, dx, dy = xc.shape[0], xc.shape[1], yc.shape[1]
    if n * n * (dx + dy) < n * dx * dy:
        cross = float((_gram(xc) * _gram(yc)).sum())
    else:
        cross = float((yc.T @ xc).pow(2).sum())
    x_norm = _self_norm(xc) if x_norm is None else x_norm
    y_norm = _self_norm(yc) if y_norm is None else y_norm
    return _ratio(cross, x_norm, y_norm)


def _ratio(cross: float, x_norm: float, y_norm: float) -> float:
    denom = x_norm * y_norm
    # A constant side has no centred variance: similarity is undefined, not 0 or 1.
    if denom <= 0.0 or not math.isfinite(denom):
        return math.nan
    return cross / denom


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise PPCLError(
            "CKA needs two 2-D feature matrices over the same tokens",
            expected="x (N, Dx) and y (N, Dy)",
            found=f"x {tuple(x.shape)}, y {tuple(y.shape)}",
        )
