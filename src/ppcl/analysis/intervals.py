"""Contiguous intervals from a CKA trajectory matrix, and the budget that picks among them (METHOD.md Stage 1.2).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ppcl.errors import ConfigError, PPCLError

__all__ = [
    "Interval",
    "blocks_removed",
    "delta",
    "nested_levels",
    "param_cost",
    "scan_intervals",
    "select_budget",
    "threshold_intervals",
    "total_cost",
]

Cost = Callable[["Interval"], float]


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


def select_budget(
    intervals: Sequence[Interval], removed_cost: Cost, target: float, *, strict: bool = False
) -> list[Interval]:
    """Accept intervals cheapest-first until the accumulated cost reaches ``target``.

    This is the bare rule, without the budget guard: plans are made by :func:`ppcl.plan.propose_plan` (used by
    ``ppcl.propose_plan``, ``ppcl analyze`` / ``ppcl plan`` and the demo), which also refuses an interval scoring far
    above the accepted ones and merges identical levels. Use that for anything but studying the rule itself.

    Args:
        intervals: candidates (e.g. from :func:`scan_intervals`).
        removed_cost: what one interval removes, e.g. :func:`blocks_removed` or :func:`param_cost`.
        target: the amount to remove, in the cost's unit. ``target ≤ 0`` selects nothing.
        strict: raise if the target cannot be met, instead of returning every candidate.

    Returns:
        The accepted intervals in acceptance order, i.e. by ``(score, u, v)`` ascending (NaN scores last); the order
        in which pluggable levels enable them. If the target is unreachable and not ``strict``, all candidates in that
        order: check :func:`total_cost` against the target.
    """
    ranked = sorted(intervals, key=_rank_key)
    chosen: list[Interval] = []
    total = 0.0
    for interval in ranked:
        if total >= target:
            break
        chosen.append(interval)
        total += float(removed_cost(interval))
    if total < target and strict:
        raise ConfigError(
            "The pruning target cannot be met by the candidate intervals",
            expected=f"candidates removing at least {target:g}",
            found=f"all {len(ranked)} candidates remove {total:g}",
            fix="lower the target, raise max_len, or protect fewer blocks",
        )
    return chosen


def nested_levels(
    intervals_in_order: Sequence[Interval],
    costs: Cost | Sequence[float],
    targets: Sequence[float],
    *,
    strict: bool = False,
) -> list[list[Interval]]:
    """Nested pruning levels: for each target, the shortest prefix of the acceptance order that reaches it.

    Like :func:`select_budget`, no budget guard and no merging of identical levels; see :func:`ppcl.plan.propose_plan`.

    Args:
        intervals_in_order: acceptance order (as returned by :func:`select_budget`).
        costs: a cost function, or one cost per interval, aligned with ``intervals_in_order``.
        targets: non-decreasing targets, one per level.
        strict: raise if a target cannot be reached, instead of returning the whole order for it.

    Returns:
        One list per target; each is a prefix of the next, so every level enables a superset of the previous one.
    """
    items = list(intervals_in_order)
    values = [float(costs(i)) for i in items] if callable(costs) else [float(c) for c in costs]
    if len(values) != len(items):
        raise ConfigError("Need one cost per interval", expected=f"{len(items)} costs", found=f"{len(values)}")
    if any(b < a for a, b in zip(targets, targets[1:], strict=False)):
        raise ConfigError(
            "Level targets must not decrease", expected="non-decreasing targets", found=str(list(targets))
        )
    cumulative = [0.0]
    for c in values:
        cumulative.append(cumulative[-1] + c)
    levels: list[list[Interval]] = []
    for target in targets:
        n = next((i for i, total in enumerate(cumulative) if total >= target), None)
        if n is None:
            if strict:
                raise ConfigError(
                    "A level target cannot be met",
                    expected=f"intervals removing at least {target:g}",
                    found=f"all intervals remove {cumulative[-1]:g}",
                    fix="lower that level's target or add candidate intervals",
                )
            n = len(items)
        levels.append(items[:n])
    return levels


def blocks_removed(interval: Interval) -> float:
    """Cost function counting removed blocks (``interval.removed``)."""
    return float(interval.removed)


def param_cost(block_params: Sequence[int]) -> Cost:
    """Cost function counting removed parameters, given each block's parameter count.

    A student interval keeps one block's worth of parameters (the student is a copy of block ``u``), so it removes
    those of ``u+1..v``; a dropped interval removes all of ``u..v``.
    """
    params = [int(p) for p in block_params]

    def cost(interval: Interval) -> float:
        if interval.v >= len(params):
            raise ConfigError("Interval beyond the block list", expected=f"v < {len(params)}", found=str(interval))
        start = interval.u + 1 if interval.student else interval.u
        return float(sum(params[start : interval.v + 1]))

    return cost


def total_cost(intervals: Sequence[Interval], removed_cost: Cost) -> float:
    """Sum of ``removed_cost`` over ``intervals``."""
    return float(sum(float(removed_cost(i)) for i in intervals))


def _rank_key(interval: Interval) -> tuple[float, int, int]:
    score = interval.score if math.isfinite(interval.score) else math.inf
    return (score, interval.u, interval.v)


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
