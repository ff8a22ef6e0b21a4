"""Baseline selectors: ShortGPT Block Influence, uniform and random removal, all as dropped-block intervals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from budget_reference import blocks_removed, total_cost
from ppcl.addon import PruningAddon
from ppcl.analysis.baselines import (
    BlockInfluenceAccumulator,
    every_other_layer,
    merge_adjacent,
    random_blocks,
    select_by_influence,
    spans_for_removed,
)
from ppcl.analysis.intervals import Interval
from ppcl.api import plan_from_removed
from ppcl.errors import ConfigError, PPCLError
from ppcl.runtime import apply_addon, set_level
from tiny_models import build_tiny


def test_block_influence_streaming_and_mask() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=g)
    y = x + 0.5 * torch.randn(2, 30, 16, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    y[~mask] = -x[~mask]  # padding that would count as maximal influence if not masked
    acc = BlockInfluenceAccumulator()
    acc.update(x[0], y[0])
    acc.update(x[1], y[1], mask=mask[1])
    flat_x, flat_y = x[mask], y[mask]
    expected = float((1 - torch.nn.functional.cosine_similarity(flat_x.double(), flat_y.double(), dim=-1)).mean())
    assert acc.n_tokens == 50
    assert acc.value() == pytest.approx(expected, rel=1e-12)
    one = BlockInfluenceAccumulator()
    one.update(x, y, mask=mask)  # (B, S, D) with a (B, S) mask
    assert one.value() == pytest.approx(expected, rel=1e-12)
    part = BlockInfluenceAccumulator()
    part.update(flat_x[:10], flat_y[:10])
    rest = BlockInfluenceAccumulator()
    rest.update(flat_x[10:], flat_y[10:])
    part.merge(rest)
    assert part.value() == pytest.approx(expected, rel=1e-12)
    identity = BlockInfluenceAccumulator()
    identity.update(x, x)
    assert identity.value() == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(BlockInfluenceAccumulator().value())
    with pytest.raises(PPCLError):
        acc.update(x, y[..., :8])


def test_select_by_influence() -> None:
    bi = [0.9, 0.01, 0.5, 0.02, 0.02, 0.3, 0.001, 0.8]
    picked = select_by_influence(bi, 3)
    assert picked == [Interval(6, 6, student=False), Interval(1, 1, student=False), Interval(3, 3, student=False)]
    assert picked[0].score == pytest.approx(0.001)
    assert total_cost(picked, blocks_removed) == 3  # dropped blocks remove themselves
    protected = select_by_influence(torch.tensor(bi), 3, first=2, last=5)
    assert [i.u for i in protected] == [3, 4, 5]  # ties (3, 4) by index
    assert select_by_influence(bi, 0) == []
    with pytest.raises(PPCLError, match="undefined"):
        select_by_influence([0.1, math.nan, 0.2], 1)
    with pytest.raises(ConfigError):
        select_by_influence(bi, 5, first=2, last=5)


def test_every_other_layer() -> None:
    assert [i.u for i in every_other_layer(2, 11, 5)] == [3, 5, 7, 9, 11]
    spread = every_other_layer(0, 59, 25)
    blocks = [i.u for i in spread]
    assert len(set(blocks)) == 25 and all(0 <= b <= 59 for b in blocks) and blocks == sorted(blocks)
    assert all(not i.student and i.removed == 1 for i in spread)
    assert [i.u for i in every_other_layer(0, 3, 4)] == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        every_other_layer(0, 3, 5)


def test_random_blocks() -> None:
    a = random_blocks(2, 57, 25, seed=1)
    assert a == random_blocks(2, 57, 25, seed=1)
    assert a != random_blocks(2, 57, 25, seed=2)
    assert len({i.u for i in a}) == 25 and all(2 <= i.u <= 57 and i.u == i.v for i in a)
    assert random_blocks(2, 57, 10, seed=1) == a[:10]  # smaller budgets are prefixes


def test_merge_adjacent() -> None:
    runs = merge_adjacent([Interval(b, b, student=False) for b in (7, 3, 4, 9, 8)])
    assert runs == [Interval(3, 4, student=False), Interval(7, 9, student=False)]
    assert total_cost(runs, blocks_removed) == 5
    with pytest.raises(PPCLError):
        merge_adjacent([Interval(3, 5)])


def _dropped(*blocks: int) -> list[Interval]:
    return [Interval(b, b, student=False) for b in blocks]


def test_spans_for_removed() -> None:
    spans = spans_for_removed(_dropped(9, 3, 4, 7, 4))  # unordered, with a duplicate
    assert spans == [Interval(2, 4), Interval(6, 7), Interval(8, 9)]  # the block before each run absorbs it
    assert all(s.student and s.score == 0.0 for s in spans)
    assert total_cost(spans, blocks_removed) == 4
    assert spans_for_removed([Interval(5, 7, student=False)]) == [Interval(4, 7)]
    assert spans_for_removed([]) == []
    with pytest.raises(ConfigError, match="protect block 0"):
        spans_for_removed(_dropped(0, 5))
    with pytest.raises(PPCLError):
        spans_for_removed([Interval(3, 5)])  # already a student span


def test_plan_from_removed_removes_exactly_those_blocks() -> None:
    model = build_tiny("qwenimage").model
    plan = plan_from_removed(_dropped(2, 4), type(model), model.config, "b2", protect_first=1, protect_last=1)
    assert plan.level_names == ["b2"]
    assert plan.removed_blocks("b2") == [2, 4]
    assert plan.kept_blocks("b2") == [0, 1, 3, 5]
    assert [r.span.inclusive for r in plan.replacements] == [(1, 2), (3, 4)]
    with pytest.raises(ConfigError, match="cannot all become"):
        plan_from_removed(_dropped(1, 3), type(model), model.config, protect_first=1, protect_last=1)
    with pytest.raises(ConfigError, match="No block"):
        plan_from_removed([], type(model), model.config)
    flux = build_tiny("flux").model  # 3 dual-stream + 3 single-stream blocks: block 3 starts the second stack
    with pytest.raises(ConfigError, match="cannot all become"):
        plan_from_removed(_dropped(3), type(flux), flux.config, protect_first=0, protect_last=0)


@torch.no_grad()
def test_untrained_removed_plan_equals_the_teacher_without_those_blocks() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    reference = copy.deepcopy(model)
    for i in (4, 3, 1):  # delete from the back so indices stay valid
        del reference.transformer_blocks[i]
    expected = reference(**inputs, return_dict=False)[0]
    plan = plan_from_removed(_dropped(1, 3, 4), type(model), model.config, "drop", protect_first=0, protect_last=1)
    apply_addon(model, PruningAddon.from_plan(model, plan))
    set_level(model, "drop")
    torch.testing.assert_close(case.forward(inputs), expected, rtol=0, atol=1e-6)
