"""Contiguous intervals from a CKA trajectory matrix (METHOD.md Stage 1.2); the budget that picks among them is
applied by :mod:`ppcl.plan` (:func:`ppcl.plan.plan_from_intervals`).

Conventions (read these before using the numbers):

* An :class:`Interval` ``[u, v]`` is **inclusive**, as in the paper: ``Interval(15, 24)`` covers blocks 15..24, ten
  blocks. ``.span`` is the same range as a half-open Python slice ``(u, v + 1)``.
* ``student=True`` (every interval this module makes): one student block replaces blocks ``u..v``, so ``v − u``
  blocks are removed (``.removed``). ``student=False`` (used by the baselines in :mod:`ppcl.analysis.baselines`):
  blocks ``u..v`` are dropped outright with nothing in their place, so ``v − u + 1`` are removed.
* ``cka[u, k]`` is the similarity of the teacher's ``x_k`` and the proxy that keeps block ``u`` and linearises
  ``u+1..k``; ``cka[u, u] = 1`` by definition (the matrix diagonal is not read). ``Δ(u, k) = cka(u, k−1) − cka(u, k)``.
* ``first`` / ``last`` are the inclusive range of blocks an interval may touch; protecting the first two and last two
  of ``L`` blocks is ``first=2, last=L−3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ppcl.errors import ConfigError, PPCLError

__all__ = ["Interval", "delta", "scan_intervals", "threshold_intervals"]


@dataclass(frozen=True, order=False)
class Interval:
    """Blocks ``u..v`` (inclusive) replaced by one student block (``student=True``) or dropped (``student=False``).

    Attributes:
        u, v: first and last block, inclusive.
        cka: ``cka(u, v)`` of the trajectory that proposed it (NaN when not from a trajectory).
        score: the selection key, lower = cheaper to remove; ``(1 − cka) / (v − u)`` for trajectory intervals.
        student: whether a student block stands in for the range.

    Equality and hashing use ``(u, v, student)`` only: the same blocks are the same interval whatever its score.
    """

    u: int
    v: int
    cka: float = field(default=math.nan, compare=False)
    score: float = field(default=math.nan, compare=False)
    student: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.u <= self.v:
            raise PPCLError("An interval is malformed", expected="0 <= u <= v", found=f"u={self.u}, v={self.v}")

    @property
    def span(self) -> tuple[int, int]:
        """The same blocks as a half-open range ``(u, v + 1)``, e.g. ``transformer_blocks[u : v + 1]``."""
        return (self.u, self.v + 1)

    @property
    def n_blocks(self) -> int:
        """How many teacher blocks the interval covers, ``v − u + 1``."""
        return self.v - self.u + 1

    @property
    def removed(self) -> int:
        """Blocks fewer after the replacement: ``v − u`` with a student, ``v − u + 1`` without."""
        return self.v - self.u + (0 if self.student else 1)

    def __str__(self) -> str:
        kind = "" if self.student else " (dropped)"
        return f"[{self.u},{self.v}]{kind}"


def delta(cka: Tensor, u: int) -> Tensor:
    """``Δ(u, k) = cka(u, k−1) − cka(u, k)`` for every ``k``.

    Args:
        cka: ``(L, L)`` trajectory matrix (NaN where not computed).
        u: the start block.

    Returns:
        ``(L,)`` float64 indexed by ``k`` itself: ``Δ(u, k)`` for ``k > u``, NaN for ``k ≤ u`` and wherever either
        term is NaN (NaN propagates through the subtraction).
    """
    L = _check_matrix(cka)
    if not 0 <= u < L:
        raise ConfigError("The start block is out of range", expected=f"0 <= u < {L}", found=str(u))
    row = cka[u].to(torch.float64).clone()
    row[u] = 1.0
    out = torch.full((L,), math.nan, dtype=torch.float64)
    out[u + 1 :] = row[u:-1] - row[u + 1 :]
    return out


def scan_intervals(
    cka: Tensor, max_len: int = 10, first: int = 0, last: int | None = None, *, tol: float = 0.0
) -> list[Interval]:
    """The Δ boundary rule: consecutive intervals tiling ``[first, last]``.

    From ``u = first``: the interval ends at ``v = k − 1`` for the first ``k ≥ u + 2`` with
    ``Δ(u, k) > Δ(u, k − 1) + tol`` (the drop starts growing again: block ``k`` breaks the unit); if there is none,
    ``v`` is the length bound ``u + max_len − 1`` (``max_len`` counts the interval's blocks, student block included) or
    ``last``, whichever comes first. The next scan starts at ``v + 1``; scanning stops when ``u + 1 > last``. A
    one-block tail (it would remove nothing) is dropped.

    Raises:
        ConfigError: bad ``max_len`` / range.
        PPCLError: a ``cka`` value the rule needs is NaN (e.g. trajectories computed with too small a ``max_len``).
    """
    first, last = _check_range(cka, max_len, first, last)
    out: list[Interval] = []
    u = first
    while u + 1 <= last:
        bound = min(u + max_len - 1, last)
        d = delta(cka, u)
        _require_defined(d, u, bound)
        v = bound
        for k in range(u + 2, bound + 1):
            if float(d[k]) > float(d[k - 1]) + tol:
                v = k - 1
                break
        out.append(_make(cka, u, v))
        u = v + 1
    return out


def threshold_intervals(
    cka: Tensor, threshold: float, max_len: int = 10, first: int = 0, last: int | None = None
) -> list[Interval]:
    """The fixed-threshold rule the paper ablates: an interval grows while ``cka(u, k) ≥ threshold``.

    From ``u = first``: ``v`` is the largest ``k ≤ min(u + max_len − 1, last)`` with ``cka(u, j) ≥ threshold`` for
    all ``u < j ≤ k``. If even ``cka(u, u + 1)`` is below the threshold, block ``u`` starts no interval and the scan
    moves to ``u + 1``; otherwise it continues at ``v + 1``. NaN counts as below the threshold.
    """
    first, last = _check_range(cka, max_len, first, last)
    out: list[Interval] = []
    u = first
    while u + 1 <= last:
        v = u
        for k in range(u + 1, min(u + max_len - 1, last) + 1):
            value = float(cka[u, k])
            if not value >= threshold:
                break
            v = k
        if v > u:
            out.append(_make(cka, u, v))
        u = v + 1
    return out


def _make(cka: Tensor, u: int, v: int) -> Interval:
    value = float(cka[u, v])
    return Interval(u, v, cka=value, score=(1.0 - value) / (v - u))


def _require_defined(d: Tensor, u: int, bound: int) -> None:
    missing = [k for k in range(u + 1, bound + 1) if math.isnan(float(d[k]))]
    if missing:
        raise PPCLError(
            f"The CKA trajectory from block {u} is undefined where the boundary rule needs it",
            expected=f"finite cka({u}, k) for k = {u + 1}..{bound}",
            found=f"NaN at k = {missing}",
            fix=(
                "compute the trajectories with max_len >= the interval length bound - 1, and check for constant "
                "features"
            ),
        )


def _check_matrix(cka: Tensor) -> int:
    if cka.dim() != 2 or cka.shape[0] != cka.shape[1]:
        raise PPCLError("The CKA matrix must be square", expected="(L, L)", found=f"shape {tuple(cka.shape)}")
    return int(cka.shape[0])


def _check_range(cka: Tensor, max_len: int, first: int, last: int | None) -> tuple[int, int]:
    L = _check_matrix(cka)
    last = L - 1 if last is None else last
    if max_len < 2:
        raise ConfigError(
            "The interval length bound is too small",
            expected="max_len >= 2 (an interval removes max_len - 1 blocks)",
            found=str(max_len),
        )
    if not 0 <= first <= L - 1 or not 0 <= last <= L - 1:
        raise ConfigError(
            "The allowed block range is outside the model",
            expected=f"0 <= first, last <= {L - 1}",
            found=f"first={first}, last={last}",
        )
    return first, last
