"""The Δ boundary rule, the length bound, protection, the budget and nested levels on hand-built CKA matrices."""

from __future__ import annotations

import math

import pytest
import torch

from budget_reference import blocks_removed, nested_levels, param_cost, select_budget, total_cost
from ppcl.analysis.intervals import Interval, delta, scan_intervals, threshold_intervals
from ppcl.errors import ConfigError, PPCLError


def product_cka(q: list[float], max_len: int | None = None) -> torch.Tensor:
    """``cka(u, k) = Π_{j=u+1..k} q_j``: block ``j`` keeps a fraction ``q_j`` of similarity when linearised.

    Then ``Δ(u, k) = cka(u, k−1)(1 − q_k)``: it shrinks along a run of equally linear blocks and jumps at a block
    with small ``q``. Entries beyond ``u + max_len`` are NaN, as :func:`cka_trajectories` leaves them.
    """
    L = len(q)
    out = torch.full((L, L), math.nan, dtype=torch.float64)
    for u in range(L):
        value = 1.0
        out[u, u] = 1.0
        for k in range(u + 1, L if max_len is None else min(L, u + max_len + 1)):
            value *= q[k]
            out[u, k] = value
    return out


def spans(intervals: list[Interval]) -> list[tuple[int, int]]:
    return [(i.u, i.v) for i in intervals]


def test_interval_conventions() -> None:
    i = Interval(15, 24, cka=0.9, score=0.01)
    assert (i.span, i.n_blocks, i.removed, str(i)) == ((15, 25), 10, 9, "[15,24]")
    dropped = Interval(3, 3, student=False)
    assert dropped.removed == 1 and dropped.span == (3, 4) and str(dropped) == "[3,3] (dropped)"
    assert Interval(15, 24) == i and hash(Interval(15, 24)) == hash(i)  # identity = blocks, not score
    assert Interval(3, 3) != dropped
    with pytest.raises(PPCLError):
        Interval(5, 4)


def test_delta() -> None:
    cka = product_cka([1.0, 0.9, 0.5, 0.9])
    d = delta(cka, 0)
    assert math.isnan(float(d[0]))
    torch.testing.assert_close(d[1:], torch.tensor([0.1, 0.9 * 0.5, 0.45 * 0.1], dtype=torch.float64))
    assert math.isnan(float(delta(product_cka([1.0, 0.9, 0.9, 0.9], max_len=1), 0)[2]))  # NaN-aware


def test_run_of_linear_layers() -> None:
    #          0    1     2     3    4     5     6     7     8    9     10    11
    q = [1.0, 0.99, 0.99, 0.5, 0.98, 0.99, 0.99, 0.99, 0.4, 0.99, 0.99, 0.99]
    found = scan_intervals(product_cka(q))
    assert spans(found) == [(0, 2), (3, 7), (8, 11)]
    first = found[1]
    expected_cka = 0.98 * 0.99 * 0.99 * 0.99
    assert first.cka == pytest.approx(expected_cka)
    assert first.score == pytest.approx((1 - expected_cka) / 4)
    assert scan_intervals(product_cka(q)) == found  # deterministic
    # A less linear block inside the run (q_5 = 0.98 after q_4 = 0.99) makes the drop grow: the run splits there.
    q[4], q[5] = 0.99, 0.98
    assert spans(scan_intervals(product_cka(q))) == [(0, 2), (3, 4), (5, 7), (8, 11)]


def test_rule_ends_at_first_growing_drop() -> None:
    # Row 0: Δ = 0.05, 0.03, 0.01, 0.02 (grows at k = 4) → v = 3, although cka(0, 4) = 0.89 is still high and the
    # biggest drop comes later.
    cka = torch.full((7, 7), math.nan, dtype=torch.float64)
    cka[0, :7] = torch.tensor([1.0, 0.95, 0.92, 0.91, 0.89, 0.3, 0.2], dtype=torch.float64)
    cka[4, 4:7] = torch.tensor([1.0, 0.9, 0.85], dtype=torch.float64)
    assert spans(scan_intervals(cka, max_len=10)) == [(0, 3), (4, 6)]
    # A growth at k = u + 2 gives the shortest interval, [u, u + 1].
    cka[0, 2] = 0.80  # Δ(0,2) = 0.15 > Δ(0,1) = 0.05
    cka[2, 2:7] = torch.tensor([1.0, 0.99, 0.985, 0.982, 0.98], dtype=torch.float64)
    assert spans(scan_intervals(cka)) == [(0, 1), (2, 6)]
    # Equal drops do not end an interval; ``tol`` ignores growth below it (binary fractions keep the Δs exact).
    flat = torch.full((6, 6), math.nan, dtype=torch.float64)
    flat[0] = torch.tensor([1.0, 0.875, 0.75, 0.625, 0.5, 0.25], dtype=torch.float64)  # Δ: 1/8 four times, then 1/4
    assert spans(scan_intervals(flat)) == [(0, 4)]
    assert spans(scan_intervals(flat, tol=0.2)) == [(0, 5)]


def test_length_bound_and_tail() -> None:
    q = [1.0] + [0.99] * 29
    assert spans(scan_intervals(product_cka(q), max_len=10)) == [(0, 9), (10, 19), (20, 29)]
    assert spans(scan_intervals(product_cka(q), max_len=10, last=28)) == [(0, 9), (10, 19), (20, 28)]
    # A one-block tail ([20, 20]) would remove nothing: it is not emitted.
    assert spans(scan_intervals(product_cka(q[:21]), max_len=10)) == [(0, 9), (10, 19)]
    # Trajectories computed up to u + 9 suffice for a bound of 10 blocks; shorter ones are refused.
    assert spans(scan_intervals(product_cka(q, max_len=9), max_len=10)) == [(0, 9), (10, 19), (20, 29)]
    with pytest.raises(PPCLError, match="undefined"):
        scan_intervals(product_cka(q, max_len=5), max_len=10)
    with pytest.raises(ConfigError):
        scan_intervals(product_cka(q), max_len=1)


def test_protection() -> None:
    L = 16
    q = [1.0] + [0.99] * (L - 1)
    found = scan_intervals(product_cka(q), max_len=5, first=2, last=L - 3)
    assert spans(found) == [(2, 6), (7, 11), (12, 13)]
    assert all(2 <= i.u and i.v <= L - 3 for i in found)
    assert scan_intervals(product_cka(q), first=9, last=8) == []
    with pytest.raises(ConfigError):
        scan_intervals(product_cka(q), last=L)


def test_threshold_rule() -> None:
    q = [1.0, 0.99, 0.99, 0.5, 0.99, 0.98, 0.99, 0.99, 0.4, 0.99, 0.99, 0.99]
    # u=0 grows to 2; u=3 grows while the product stays ≥ 0.96 (to 6); u=7's first step (q_8 = 0.4) fails, so 7 is
    # skipped; u=8 runs to the end.
    assert spans(threshold_intervals(product_cka(q), 0.96)) == [(0, 2), (3, 6), (8, 11)]
    assert spans(threshold_intervals(product_cka(q), 0.96, max_len=3)) == [(0, 2), (3, 5), (6, 7), (8, 10)]


def candidates() -> list[Interval]:
    return [
        Interval(2, 4, score=0.02),
        Interval(5, 9, score=0.01),
        Interval(10, 11, score=0.05),
        Interval(12, 14, score=0.01),  # ties with [5, 9]: the earlier position goes first
        Interval(15, 17, score=math.nan),  # unscored: last
    ]


def test_select_budget() -> None:
    cands = candidates()
    assert spans(select_budget(cands, blocks_removed, 5)) == [(5, 9), (12, 14)]  # 4 + 2 = 6 ≥ 5
    assert spans(select_budget(cands, blocks_removed, 4)) == [(5, 9)]
    assert select_budget(cands, blocks_removed, 0) == []
    everything = select_budget(cands, blocks_removed, 100)
    assert spans(everything) == [(5, 9), (12, 14), (2, 4), (10, 11), (15, 17)]
    assert total_cost(everything, blocks_removed) == 4 + 2 + 2 + 1 + 2
    with pytest.raises(ConfigError, match="cannot be met"):
        select_budget(cands, blocks_removed, 100, strict=True)
    assert select_budget(list(reversed(cands)), blocks_removed, 5) == select_budget(cands, blocks_removed, 5)


def test_param_cost() -> None:
    params = [10, 20, 30, 40, 50]
    cost = param_cost(params)
    assert cost(Interval(1, 3)) == 30 + 40  # the student keeps block 1's worth
    assert cost(Interval(1, 3, student=False)) == 20 + 30 + 40
    with pytest.raises(ConfigError):
        cost(Interval(3, 5))


def test_nested_levels() -> None:
    order = select_budget(candidates(), blocks_removed, 100)
    levels = nested_levels(order, blocks_removed, [4, 6, 8, 100])
    assert [spans(level) for level in levels[:3]] == [[(5, 9)], [(5, 9), (12, 14)], [(5, 9), (12, 14), (2, 4)]]
    assert levels[3] == order
    for small, large in zip(levels, levels[1:], strict=False):
        assert large[: len(small)] == small
    assert nested_levels(order, [1.0] * 5, [0.5, 3]) == [order[:1], order[:3]]
    with pytest.raises(ConfigError):
        nested_levels(order, blocks_removed, [6, 4])
    with pytest.raises(ConfigError):
        nested_levels(order, blocks_removed, [100], strict=True)
    with pytest.raises(ConfigError):
        nested_levels(order, [1.0], [1])
