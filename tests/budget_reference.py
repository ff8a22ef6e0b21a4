"""The paper's budget rule, written out plainly as an independent reference for the tests.

The library applies the rule in one place, :func:`ppcl.plan.plan_from_intervals` (with the budget guard and the merging
of identical levels); these functions are the bare rule (accept intervals cheapest-first until a target is met; nested
levels are prefixes of that order), so the tests can check the library against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ppcl.analysis.intervals import Interval
from ppcl.errors import ConfigError

Cost = Callable[[Interval], float]


def select_budget(
    intervals: Sequence[Interval], removed_cost: Cost, target: float, *, strict: bool = False
) -> list[Interval]:
    """Accept intervals cheapest-first until the accumulated cost reaches ``target``.

    The bare rule, without the budget guard (see the module docstring).

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

    Like :func:`select_budget`, no budget guard and no merging of identical levels.

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
