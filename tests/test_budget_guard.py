"""The budget guard of the proposal (METHOD.md "Beyond the paper"), identical levels, and the per-level scores.

The synthetic candidates copy the committed toy teacher's report (docs/example-report): on 16 equal blocks, [12, 13]
removes 1 block, [7, 11] 4, [5, 6] 1 and [2, 4] 2, i.e. 6.25 %, 31.25 %, 37.5 % and 50 % of block parameters
cumulatively, cheapest first; the last one scores 18.7x the largest score before it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from budget_reference import nested_levels, param_cost, select_budget
from ppcl.analysis.intervals import Interval
from ppcl.cli.main import main
from ppcl.errors import ArtefactError, ConfigError
from ppcl.plan import DEFAULT_GUARD_FACTOR, Level, PruningPlan, plan_from_intervals, with_width_level

QWEN = "QwenImageTransformer2DModel"
BLOCKS = [10] * 16
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-report"


@dataclass
class FakeInterval:
    u: int
    v: int
    score: float


TOY = [FakeInterval(2, 4, 0.058), FakeInterval(5, 6, 0.0031), FakeInterval(7, 11, 0.0021), FakeInterval(12, 13, 0.0009)]
P25, P40 = ("depth:12-14", "depth:7-12"), ("depth:12-14", "depth:7-12", "depth:5-7")
EVERYTHING = (*P40, "depth:2-5")


def _propose(
    targets: tuple[float, ...] = (0.25, 0.4, 0.5),
    intervals: list[FakeInterval] | None = None,
    kind: str = "fraction",
    **kwargs: object,
) -> PruningPlan:
    return plan_from_intervals(
        intervals or TOY,
        "qwenimage",
        QWEN,
        (16,),
        BLOCKS,
        targets,
        kind,  # type: ignore[arg-type]
        **kwargs,
    )


def _ids(plan: PruningPlan) -> dict[str, tuple[str, ...]]:
    return {lvl.name: lvl.replacement_ids for lvl in plan.levels}


# ------------------------------------------------------------------------------------------------------ the guard
def test_an_expensive_interval_is_refused_and_the_level_undershoots_with_a_note() -> None:
    plan = _propose()
    assert DEFAULT_GUARD_FACTOR == 10
    assert _ids(plan) == {"p25": P25, "p40": P40}  # p50 would equal p40: dropped
    assert "depth:2-5" not in [r.id for r in plan.replacements]
    assert plan.block_param_fraction("p40") == pytest.approx(0.375)
    assert "NOT reached: budget guard" in plan.level("p40").description
    guard_note = next(n for n in plan.notes if n.startswith("level p40:"))
    for part in (
        "40.0% of block parameters",
        "37.5% of block parameters",
        "[2, 4]",
        "score 0.058",
        "18.7x",
        "0.0031",
        "limit 10x",
    ):
        assert part in guard_note, (part, guard_note)
    refused = plan.provenance["guard"]["refused"]
    assert refused["inclusive"] == [2, 4] and refused["ratio"] == pytest.approx(0.058 / 0.0031)
    assert refused["reference"] == 0.0031 and refused["limit"] == pytest.approx(0.031)
    assert [o["id"] for o in plan.provenance["order"]] == list(P40)


def test_disabling_the_guard_restores_the_unguarded_rule() -> None:
    # The unguarded rule of ppcl.analysis.intervals is the oracle for the old behaviour.
    candidates = [Interval(i.u, i.v, score=i.score) for i in TOY]
    order = select_budget(candidates, param_cost(BLOCKS), math.inf)
    targets = (0.25, 0.4)
    expected = nested_levels(order, param_cost(BLOCKS), [t * sum(BLOCKS) for t in targets])
    for off in (0, 0.0, math.inf):
        plan = _propose(targets, guard_factor=off)
        assert [len(plan.level(n).replacement_ids) for n in ("p25", "p40")] == [len(e) for e in expected]
        assert _ids(plan) == {"p25": P25, "p40": EVERYTHING}
        assert plan.notes == [] and plan.provenance["guard"]["factor"] == 0
        assert plan.provenance["guard"]["refused"] is None
    assert _ids(_propose(targets)) == {"p25": P25, "p40": P40}  # and the default guard does refuse


def test_the_factor_is_the_limit() -> None:
    assert _ids(_propose((0.25, 0.4), guard_factor=19))["p40"] == EVERYTHING  # 18.7x < 19
    assert _ids(_propose((0.25, 0.4), guard_factor=18))["p40"] == P40
    assert _ids(_propose((0.25, 0.4), guard_factor=2.5)) == {"p25": P25, "p40": P40}
    # 0.0021 > 2 x max(0.0009, floor 0.001): p25 stops after one interval, and p40 would be the same level.
    tight = _propose((0.25, 0.4), guard_factor=2)
    assert _ids(tight) == {"p25": ("depth:12-14",)}
    assert any(n.startswith("level p25:") and "limit 2x the guard floor 0.001" in n for n in tight.notes)
    assert any(n.startswith("level p40 ") and "dropped" in n for n in tight.notes)


def test_the_first_interval_is_always_allowed_and_the_floor_protects_tiny_references() -> None:
    alone = _propose((0.1,), [FakeInterval(3, 5, 0.9)])
    assert _ids(alone) == {"p10": ("depth:3-6",)} and alone.notes == []
    # 1e-4 after 1e-6 is 100x, but both are negligible: the floor (1e-3) keeps the guard from firing ...
    tiny = [FakeInterval(3, 5, 1e-6), FakeInterval(7, 9, 1e-4)]
    assert _ids(_propose((0.1, 0.2), tiny))["p20"] == ("depth:3-6", "depth:7-10")
    # ... and without it the ratio alone refuses the second interval (the note names the floor only when it binds).
    strict = _propose((0.1, 0.2), tiny, guard_floor=0)
    assert _ids(strict) == {"p10": ("depth:3-6",)}
    assert any("100.0x" in n and "[7, 9]" in n for n in strict.notes)
    above = _propose((0.1, 0.2), [FakeInterval(3, 5, 1e-6), FakeInterval(7, 9, 0.02)])
    assert _ids(above) == {"p10": ("depth:3-6",)}
    assert any("limit 10x the guard floor 0.001" in n for n in above.notes)


def test_overlaps_are_skipped_not_refused() -> None:
    # [6, 8] overlaps [7, 11]; the guard looks at the next *usable* interval, and the reference is unchanged.
    plan = _propose((0.25, 0.4), [*TOY, FakeInterval(6, 8, 0.0025)])
    assert _ids(plan)["p40"] == P40
    assert {tuple(s["inclusive"]): s["reason"] for s in plan.provenance["skipped"]} == {(6, 8): "overlaps depth:7-12"}


@pytest.mark.parametrize("bad", [-1.0, 0.5, math.nan, True, "10"])
def test_bad_guard_factors_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        _propose(guard_factor=bad)
    assert err.value.expected and err.value.found and err.value.fix and "guard" in err.value.what
    with pytest.raises(ConfigError):
        _propose(guard_floor=-1e-3)


# -------------------------------------------------------------------------------------------- identical levels
def test_identical_levels_are_merged_into_the_first_with_a_note() -> None:
    plan = _propose((0.3, 0.31))  # [12, 13] + [7, 11] = 31.25 % meets both
    assert plan.level_names == ["p30"]
    assert plan.notes == [
        "level p31 (target 31.0% of block parameters removed) dropped: it would hold the same 2 "
        "intervals as level p30 (31.2% of block parameters removed)"
    ]
    assert plan.provenance["dropped_levels"] == [{"name": "p31", "target": 0.31, "same_as": "p30"}]
    # Unreachable targets used to repeat the whole order; now one level holds it.
    blocks = _propose((2, 9, 12), kind="blocks", guard_factor=0)
    assert blocks.level_names == ["b2", "b9"] and len(blocks.removed_blocks("b9")) == 8
    assert any(n.startswith("level b12 ") and "same 4 intervals as level b9" in n for n in blocks.notes)
    assert any(n.startswith("level b9:") and "not reached" in n for n in blocks.notes)
    names = [lvl.name for lvl in blocks.levels]
    assert len({lvl.replacement_ids for lvl in blocks.levels}) == len(names)


def test_no_proposal_of_the_committed_teacher_has_identical_levels() -> None:
    from ppcl.analysis import RedundancyReport
    from ppcl.plan import plan_from_report
    from ppcl.toy.teacher import ToyTeacher

    report, config = RedundancyReport.load(EXAMPLE), ToyTeacher.load().transformer.config
    guarded = plan_from_report(report, config, (0.25, 0.4, 0.5))
    assert _ids(guarded) == {"p25": P25, "p40": P40}
    assert any("[2, 4]" in n and "18.9x" in n for n in guarded.notes)  # the report's own scores
    assert _ids(plan_from_report(report, config, (0.25, 0.375), level_names=("p25", "p40"))) == {"p25": P25, "p40": P40}
    off = plan_from_report(report, config, (0.25, 0.4, 0.5), guard_factor=0)
    assert _ids(off) == {"p25": P25, "p40": EVERYTHING}
    # The committed example plan is the guarded proposal (`ppcl plan --report docs/example-report ...`).
    committed = PruningPlan.load(EXAMPLE / "plan")
    assert _ids(committed) == _ids(guarded)


# ---------------------------------------------------------------------------------------- scores per level, JSON
def test_every_level_records_and_prints_its_worst_score() -> None:
    plan = _propose()
    p25, p40 = plan.level("p25"), plan.level("p40")
    assert (p25.worst_score, p25.cheapest_score) == (0.0021, 0.0009)
    assert (p40.worst_score, p40.cheapest_score) == (0.0031, 0.0009)
    assert p40.score_ratio == pytest.approx(0.0031 / 0.0009)
    summary = plan.summary()
    assert "level p25:" in summary and "worst interval score 0.0021 (2.3x the cheapest)" in summary
    assert "worst interval score 0.0031 (3.4x the cheapest)" in summary
    unguarded = _propose((0.25, 0.4), guard_factor=0).summary()
    assert "worst interval score 0.058 (64.4x the cheapest)" in unguarded
    # Width levels carry their depth base's scores.
    wide = with_width_level(plan, "p25+w", [(2, 4)], [], base_level="p25")
    assert wide.level("p25+w").worst_score == 0.0021 and "p25+w: " in wide.summary()


def test_plan_json_round_trip_and_older_plans_still_load(tmp_path: Path) -> None:
    plan = _propose()
    data = json.loads(json.dumps(plan.to_json()))
    assert data["levels"][1]["worst_score"] == 0.0031 and data["levels"][1]["cheapest_score"] == 0.0009
    assert PruningPlan.from_json(data) == plan
    assert PruningPlan.load(plan.save(tmp_path / "plan")) == plan
    # Plans written before the field: no scores, nothing printed, and written back byte-equal.
    addon_plan = json.loads((Path(__file__).parent / "fixtures" / "addon_v1" / "ppcl_addon.json").read_text())["plan"]
    old = PruningPlan.from_json(addon_plan)  # the committed format fixture predates the scores
    assert old.level_names == ["a", "b"]
    assert all(lvl.worst_score is None and lvl.cheapest_score is None for lvl in old.levels)
    assert "worst interval score" not in old.summary()
    assert "worst_score" not in json.dumps(old.to_json())
    assert Level.from_json({"name": "x", "replacements": [], "worst_score": None}).worst_score is None
    bad = json.loads(json.dumps(plan.to_json()))
    bad["levels"][0]["worst_score"] = "big"
    with pytest.raises(ArtefactError, match=r"levels\[0\]\.worst_score"):
        PruningPlan.from_json(bad)


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_plan_guard_factor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guarded, off = tmp_path / "guarded", tmp_path / "off"
    assert main(["-q", "plan", "--report", str(EXAMPLE), "--out", str(guarded)]) == 0
    out = capsys.readouterr().out
    assert "worst interval score" in out and "the budget guard refused [2, 4]" in out
    data = json.loads((guarded / "plan.json").read_text())
    assert [lv["name"] for lv in data["levels"]] == ["p25", "p40"]
    assert main(["-q", "plan", "--report", str(EXAMPLE), "--out", str(off), "--guard-factor", "0"]) == 0
    data = json.loads((off / "plan.json").read_text())
    assert [len(lv["replacements"]) for lv in data["levels"]] == [2, 4]
    capsys.readouterr()
    assert main(["-q", "plan", "--report", str(EXAMPLE), "--out", str(tmp_path / "bad"), "--guard-factor", "0.5"]) == 2
    assert "guard factor" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # analyze checks the factor before loading anything (the calibration folder does not even exist).
    assert (
        main(
            [
                "-q",
                "analyze",
                "--calibration",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "rep"),
                "--guard-factor",
                "-1",
            ]
        )
        == 2
    )
    assert "guard factor" in capsys.readouterr().err
