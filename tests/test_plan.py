"""PruningPlan: spans and their printing, replacements, JSON + atomic save/load, validation, parameter counting on the
meta device (tiny real models and the real 20B Qwen-Image config), and proposals from scored intervals."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ppcl.arch import FLUX_SPEC, QWENIMAGE_SPEC, SD3_SPEC, get_spec
from ppcl.errors import ArtefactError, ConfigError, PPCLError
from ppcl.plan import (
    DepthReplacement,
    Level,
    ParamTable,
    PruningPlan,
    Span,
    describe,
    param_count,
    plan_from_intervals,
    replacement_from_json,
)
from ppcl.plan import plan as plan_module
from tiny_models import TINY_ARCH_NAMES, build_tiny

QWEN = "QwenImageTransformer2DModel"
# The authors' public Qwen-Image depth plan (METHOD.md), inclusive flat indices.
PUBLIC_QWEN_INTERVALS = [
    (3, 4),
    (5, 7),
    (8, 10),
    (11, 12),
    (15, 24),
    (25, 27),
    (29, 30),
    (42, 43),
    (45, 47),
    (48, 49),
    (52, 53),
    (54, 55),
    (56, 57),
]


def depth(u: int, v: int, init: str = "first") -> DepthReplacement:
    """Depth replacement of the paper's inclusive [u, v]."""
    return DepthReplacement(Span.from_inclusive(u, v), init)  # type: ignore[arg-type]


def qwen_plan(spans: list[tuple[int, int]], blocks: int = 20, **kwargs: object) -> PruningPlan:
    """A plan over ``blocks`` Qwen-Image blocks: level "all" uses every span, level "first" the first one."""
    reps = [depth(u, v) for u, v in spans]
    levels = [Level("first", (reps[0].id,)), Level("all", tuple(r.id for r in reps))] if reps else []
    return PruningPlan("qwenimage", QWEN, (blocks,), reps, levels, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------- spans
def test_span_conventions_and_value_semantics() -> None:
    span = Span.from_inclusive(3, 4)
    assert span == Span(3, 5) and hash(span) == hash(Span(3, 5))
    assert span.inclusive == (3, 4) and span.size == 2 and span.removed == 1 and list(span.blocks) == [3, 4]
    assert str(span) == "blocks[3:5]" and span.paper() == "[3, 4] (inclusive)"
    assert sorted([Span(5, 8), Span(3, 5), Span(3, 4)]) == [Span(3, 4), Span(3, 5), Span(5, 8)]
    assert Span(3, 5).overlaps(Span(4, 9)) and not Span(3, 5).overlaps(Span(5, 9))
    assert 4 in span and 5 not in span
    for bad in [(5, 5), (-1, 2), (4, 2)]:
        with pytest.raises(ConfigError):
            Span(*bad)
    with pytest.raises(ConfigError):
        Span(True, 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Span.from_inclusive(4, 3)


def test_describe_is_stack_local() -> None:
    assert describe(Span(3, 5), QWENIMAGE_SPEC, (60,)) == "transformer_blocks[3:5]"
    assert describe(Span(20, 22), FLUX_SPEC, (19, 38)) == "single_transformer_blocks[1:3]"
    assert describe(Span(2, 4), FLUX_SPEC, (19, 38)) == "transformer_blocks[2:4]"
    assert describe(Span(18, 21), FLUX_SPEC, (19, 38)) == "transformer_blocks[18:19] + single_transformer_blocks[0:2]"
    assert describe(Span(3, 5), None, (60,)) == "blocks[3:5]"


# ------------------------------------------------------------------------------------------------ replacements
def test_depth_replacement_ids_init_and_json() -> None:
    rep = depth(15, 24)
    assert rep.id == "depth:15-25" and rep.kind == "depth"
    assert [depth(15, 24, i).init_block for i in ("first", "middle", "last")] == [15, 19, 24]
    assert rep.removed_blocks() == tuple(range(16, 25))
    assert replacement_from_json(rep.to_json()) == rep
    named = DepthReplacement(Span(3, 5), "middle", "mine")
    assert replacement_from_json(json.loads(json.dumps(named.to_json()))) == named
    # Hand-written forms: inclusive only, or start/stop only.
    assert replacement_from_json({"kind": "depth", "inclusive": [3, 4]}) == depth(3, 4)
    assert replacement_from_json({"kind": "depth", "start": 3, "stop": 5}) == depth(3, 4)
    with pytest.raises(ConfigError):
        DepthReplacement(Span(3, 5), "random")  # type: ignore[arg-type]
    with pytest.raises(ArtefactError, match="disagree"):
        replacement_from_json({"kind": "depth", "start": 3, "stop": 5, "inclusive": [3, 5]}, "replacements[0]")
    with pytest.raises(ArtefactError, match="unknown replacement kind"):
        replacement_from_json({"kind": "lora", "id": "x"})
    with pytest.raises(ArtefactError, match=r"replacements\[1\]"):
        replacement_from_json({"kind": "depth", "start": 5, "stop": 5}, "replacements[1]")


def test_student_size_follows_its_init_block() -> None:
    table = ParamTable.from_per_block([1, 10, 20, 30, 1], (5,))
    assert depth(1, 3).removed_params(table) == 10 + 20 + 30 - 10
    assert depth(1, 3, "middle").removed_params(table) == 10 + 20 + 30 - 20
    assert depth(1, 3, "last").removed_params(table) == 10 + 20 + 30 - 30


# ------------------------------------------------------------------------------------------------ plan + JSON
def test_plan_lookups_and_blocks() -> None:
    plan = qwen_plan([(2, 4), (8, 9)]).validate()
    assert [r.id for r in plan.replacements_of("all")] == ["depth:2-5", "depth:8-10"]
    assert plan.removed_blocks("all") == [3, 4, 9] and plan.removed_blocks(None) == []
    assert plan.kept_blocks("first") == [i for i in range(20) if i not in (3, 4)]
    assert plan.protected_blocks() == [0, 1, 18, 19]
    with pytest.raises(PPCLError) as info:
        plan.level("p99")
    assert "first" in str(info.value) and "all" in str(info.value)


def test_json_roundtrip_and_file_format(tmp_path: Path) -> None:
    plan = qwen_plan([(2, 4), (8, 9)], provenance={"selector": "hand"}, notes=["hello"])
    assert PruningPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    path = plan.save(tmp_path / "plan")
    assert path == tmp_path / "plan" / "plan.json"
    assert PruningPlan.load(tmp_path / "plan") == plan and PruningPlan.load(path) == plan
    text = path.read_text()
    # One replacement per line keeps the file short and hand-editable.
    assert '{"kind": "depth", "id": "depth:2-5", "start": 2, "stop": 5, "inclusive": [2, 4], "init": "first"}' in text
    assert "half-open" in json.loads(text)["span_convention"]


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = qwen_plan([(2, 4)])
    old.save(tmp_path)
    before = (tmp_path / "plan.json").read_text()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(plan_module.os, "replace", crash)
    with pytest.raises(ArtefactError, match="cannot write the plan.*disk full"):
        qwen_plan([(2, 4), (8, 9)]).save(tmp_path, overwrite=True)
    assert (tmp_path / "plan.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # the temp file is gone


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="No pruning plan"):
        PruningPlan.load(tmp_path / "missing")
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(ArtefactError, match="not valid JSON"):
        PruningPlan.load(tmp_path)
    data = qwen_plan([(2, 4)]).to_json()
    del data["levels"]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ArtefactError, match="`levels` is missing"):
        PruningPlan.load(tmp_path)
    data = qwen_plan([(2, 4)]).to_json()
    data["replacements"][0]["start"] = "2"
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ArtefactError, match=r"`replacements\[0\]\.start` has the wrong type"):
        PruningPlan.load(tmp_path)
    data = qwen_plan([(2, 4)]).to_json()
    data["replacements"][0].update(start=0, inclusive=[0, 4])
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="plan.json: Replacement depth:2-5 covers protected block"):
        PruningPlan.load(tmp_path)


# -------------------------------------------------------------------------------------------------- validation
def _bad_plans() -> dict[str, tuple[PruningPlan, list[str]]]:
    overlap = qwen_plan([(2, 4), (4, 6)])
    flux = PruningPlan("flux", "FluxTransformer2DModel", (19, 38), [depth(17, 20)], [Level("x", ("depth:17-21",))])
    sd3 = PruningPlan(
        "sd3", "SD3Transformer2DModel", (24,), [depth(20, 23)], [Level("x", ("depth:20-24",))], protect_last=0
    )
    unknown = qwen_plan([(2, 4)])
    unknown.levels.append(Level("typo", ("depth:2-6",)))
    dup_names = qwen_plan([(2, 4)])
    dup_names.levels.append(Level("all", ()))
    dup_ids = qwen_plan([(2, 4)])
    dup_ids.replacements.append(DepthReplacement(Span(8, 10), id="depth:2-5"))
    return {
        "overlap": (overlap, ["depth:2-5", "depth:4-7", "level all"]),
        "out of range": (qwen_plan([(2, 4), (15, 22)]), ["depth:15-23", "past the last block", "all"]),
        "protected first": (qwen_plan([(1, 4)]), ["depth:1-5", "protected block(s) [1]", "first, all"]),
        "protected last": (qwen_plan([(16, 18)]), ["depth:16-19", "protected block(s) [18]"]),
        "single block": (qwen_plan([(5, 5)]), ["depth:5-6", "single block"]),
        "cross stack": (
            flux,
            [
                "depth:17-21",
                "crosses a block-stack boundary",
                "level(s) x",
                "transformer_blocks[17:19] + single_transformer_blocks[0:2]",
            ],
        ),
        "sd3 last block": (sd3, ["depth:20-24", "protected block(s) [23]"]),
        "unknown reference": (unknown, ["typo", "depth:2-6"]),
        "duplicate level names": (dup_names, ["['all']", "more than once"]),
        "duplicate ids": (dup_ids, ["depth:2-5", "more than once"]),
        "wrong stack count": (PruningPlan("flux", "FluxTransformer2DModel", (57,)), ["stack sizes"]),
        "unknown arch": (PruningPlan("dit", "DiT", (10,)), ["'dit'"]),
    }


@pytest.mark.parametrize("case", list(_bad_plans()))
def test_every_violation_raises_a_helpful_config_error(case: str) -> None:
    plan, needles = _bad_plans()[case]
    with pytest.raises(ConfigError) as info:
        plan.validate()
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert info.value.expected and info.value.found


def test_public_qwen_plan_is_valid_with_default_protection() -> None:
    reps = [depth(u, v) for u, v in PUBLIC_QWEN_INTERVALS]
    plan = PruningPlan("qwenimage", QWEN, (60,), reps, [Level("public", tuple(r.id for r in reps))]).validate()
    assert plan.protected_blocks() == [0, 1, 58, 59]
    assert len(plan.kept_blocks("public")) == 35


# -------------------------------------------------------------------------------------------------- counting
def _tiny_plan(name: str, model: torch.nn.Module) -> PruningPlan:
    spec = get_spec(model)
    sizes = tuple(spec.stack_sizes(model))
    reps = [depth(1, 2), depth(3, 4)]  # 6 flat blocks, protect 1/1; Flux: one span per stack (3 + 3)
    return PruningPlan(
        spec.name,
        type(model).__name__,
        sizes,
        reps,
        [Level("one", (reps[0].id,)), Level("both", (reps[0].id, reps[1].id))],
        protect_first=1,
        protect_last=1,
    ).validate()


@pytest.mark.parametrize("name", TINY_ARCH_NAMES)
def test_param_count_matches_real_models(name: str) -> None:
    model = build_tiny(name).model
    spec = get_spec(model)
    plan = _tiny_plan(name, model)
    base = param_count(type(model), dict(model.config))
    assert base.total == sum(p.numel() for p in model.parameters())
    assert list(base.per_block) == [sum(p.numel() for p in b.parameters()) for b in spec.blocks(model)]
    for level in ("one", "both"):
        count = plan.param_count(dict(model.config), level)
        # The counted level equals the real smaller model that keeps one block per span.
        smaller = type(model).from_config(spec.rewrite_config(model.config, plan.kept_blocks(level)))
        assert count.after == sum(p.numel() for p in smaller.parameters()), (name, level)
        assert count.blocks_after == len(spec.blocks(smaller))
        assert plan.block_param_fraction(level, dict(model.config)) == pytest.approx(count.block_fraction_removed)


def test_param_count_rejects_mismatched_plan() -> None:
    model = build_tiny("qwenimage").model
    with pytest.raises(ConfigError, match="another model"):
        param_count(QWEN, dict(model.config), plan=qwen_plan([(2, 4)]), level="all")
    with pytest.raises(ConfigError, match="without a plan"):
        param_count("qwenimage", dict(model.config), level="all")


def test_real_qwen_image_public_plan_counts() -> None:
    from diffusers import QwenImageTransformer2DModel

    config = {
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "in_channels": 64,
        "out_channels": 16,
        "patch_size": 2,
        "axes_dims_rope": (16, 56, 56),
    }
    with torch.device("meta"):  # defaults must be the real 20B model
        assert dict(QwenImageTransformer2DModel().config).items() >= config.items()
    reps = [depth(u, v) for u, v in PUBLIC_QWEN_INTERVALS]
    plan = PruningPlan("qwenimage", QWEN, (60,), reps, [Level("public", tuple(r.id for r in reps))]).validate()
    count = plan.param_count(config, "public")
    msg = (
        f"total={count.total:,} per_block={count.per_block[0]:,} after={count.after:,} "
        f"removed={count.removed:,} blocks {len(count.per_block)}->{count.blocks_after}"
    )
    assert len(count.per_block) == 60 and count.blocks_after == 35, msg
    assert abs(count.total - 20.43e9) / 20.43e9 < 0.005, msg
    assert set(count.per_block) == {count.per_block[0]} and abs(count.per_block[0] - 339.8e6) < 0.1e6, msg
    assert abs(count.after - 11.9e9) / 11.9e9 < 0.01, msg
    # Exact figures, pinned so a diffusers change shows up here.
    assert (count.total, count.per_block[0], count.after) == (20_430_401_088, 339_831_296, 11_934_618_688), msg


# -------------------------------------------------------------------------------------------------- proposals
@dataclass
class FakeInterval:
    u: int
    v: int
    score: float


CANDIDATES = [
    FakeInterval(0, 2, 0.0),
    FakeInterval(5, 6, 0.3),
    FakeInterval(8, 11, 0.2),
    FakeInterval(12, 13, 0.05),
    FakeInterval(2, 4, 0.1),
    FakeInterval(3, 5, 0.15),
    FakeInterval(17, 19, 0.0),
]


def _propose(targets: list[float], kind: str = "fraction", **kwargs: object) -> PruningPlan:
    return plan_from_intervals(
        CANDIDATES,
        "qwenimage",
        QWEN,
        (20,),
        [10] * 20,
        targets,
        kind,  # type: ignore[arg-type]
        **kwargs,
    )


def test_propose_nested_cheapest_first_fraction() -> None:
    plan = _propose([0.3, 0.1])
    assert plan.level_names == ["p10", "p30"]  # sorted by target, default names
    assert plan.level("p10").replacement_ids == ("depth:12-14", "depth:2-5")
    assert plan.level("p30").replacement_ids == ("depth:12-14", "depth:2-5", "depth:8-12")
    assert plan.block_param_fraction("p10") == pytest.approx(0.15)  # 3 blocks x 10 of 200 block params
    assert plan.block_param_fraction("p30") == pytest.approx(0.30)
    assert [r.id for r in plan.replacements] == ["depth:2-5", "depth:8-12", "depth:12-14"]  # by position
    reasons = {tuple(s["inclusive"]): s["reason"] for s in plan.provenance["skipped"]}
    assert "protected" in reasons[(0, 2)] and "protected" in reasons[(17, 19)]
    assert reasons[(3, 5)] == "overlaps depth:2-5"
    assert [o["id"] for o in plan.provenance["order"]] == ["depth:12-14", "depth:2-5", "depth:8-12"]
    assert plan.notes == []
    assert PruningPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_propose_blocks_and_params_targets_and_unreachable() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("ppcl").addHandler(handler)
    try:
        plan = _propose([3, 100], "blocks", level_names=["small", "huge"])
    finally:
        logging.getLogger("ppcl").removeHandler(handler)
    assert plan.level("small").replacement_ids == ("depth:12-14", "depth:2-5")
    assert len(plan.removed_blocks("huge")) == 7  # everything usable: 1 + 2 + 3 + 1
    assert len(plan.notes) == 1 and "huge" in plan.notes[0] and "not reached" in plan.notes[0]
    assert any("not reached" in r.getMessage() and r.levelno == logging.WARNING for r in records)
    params = _propose([25], "params")
    assert params.level_names == ["r25"] and params.level("r25").replacement_ids == ("depth:12-14", "depth:2-5")


def test_propose_ties_init_and_stack_boundaries() -> None:
    ties = [FakeInterval(9, 10, 0.5), FakeInterval(3, 4, 0.5), FakeInterval(6, 7, 0.5)]
    plan = plan_from_intervals(ties, "qwenimage", QWEN, (20,), [10] * 20, [0.05], init="middle")
    assert plan.level("p5").replacement_ids == ("depth:3-5",)  # equal scores: earliest position first
    assert plan.replacements[0].init == "middle"
    flux = plan_from_intervals(
        [FakeInterval(8, 11, 0.0), FakeInterval(12, 14, 0.1)],
        "flux",
        "FluxTransformer2DModel",
        (10, 10),
        [20] * 10 + [10] * 10,
        [1],
        "blocks",
    )
    assert flux.level("b1").replacement_ids == ("depth:12-15",)
    assert "crosses" in flux.provenance["skipped"][0]["reason"]
    assert flux.describe(flux.replacements[0].span) == "single_transformer_blocks[2:5]"
    for bad in ([], [0.0], [1.5]):
        with pytest.raises(ConfigError):
            _propose(bad)
    with pytest.raises(ConfigError):
        plan_from_intervals(CANDIDATES, "qwenimage", QWEN, (20,), None, [0.1])
    with pytest.raises(ConfigError):
        plan_from_intervals([FakeInterval(3, 25, 0.0)], "qwenimage", QWEN, (20,), [10] * 20, [0.1])


def test_sd3_proposals_never_touch_the_last_block() -> None:
    plan = plan_from_intervals(
        [FakeInterval(20, 23, 0.0), FakeInterval(2, 3, 0.1)],
        "sd3",
        "SD3Transformer2DModel",
        (24,),
        [5] * 24,
        [1],
        "blocks",
        protect_last=0,
    )
    assert plan.level("b1").replacement_ids == ("depth:2-4",)
    assert SD3_SPEC.protect_last_block and 23 in plan.protected_blocks()
