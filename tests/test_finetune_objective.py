"""The guided / multi-level / on-policy fine-tune objective (stage 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ppcl.addon import PruningAddon, student_key
from ppcl.distill import DistillConfig, FinetuneObjective, finetune
from ppcl.distill.finetune import FinetuneStep, level_modules
from ppcl.distill.objective import euler_to, guided_terms
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, remove_addon
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher
from test_distill import FixedData

TINY_TOY = {
    "patch_size": 4,
    "in_channels": 48,
    "out_channels": 3,
    "num_layers": 6,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": (4, 6, 6),
}
A, B = "depth:1-3", "depth:3-5"


@pytest.fixture(scope="module")
def toy() -> ToyTeacher:
    teacher = ToyTeacher.build(seed=0, config=TINY_TOY)
    teacher.transformer.eval().requires_grad_(False)
    return teacher


def _plan(model: torch.nn.Module) -> PruningPlan:
    reps = [DepthReplacement(Span(1, 3)), DepthReplacement(Span(3, 5))]
    levels = [Level("small", (A,)), Level("big", (A, B))]
    return PruningPlan(
        "qwenimage", type(model).__name__, (6,), reps, levels, protect_first=1, protect_last=1
    ).validate()


def test_guided_terms_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    pc, pu, tc, tu = (torch.randn(2, 5, 3, generator=g) for _ in range(4))
    obj = FinetuneObjective(guidance=4.0, output_weight=1.0, guided_weight=2.0, direction_weight=3.0)
    terms = guided_terms((pc, pu), (tc, tu), obj)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    assert torch.allclose(terms["output"], 0.5 * (mse(pc, tc) + mse(pu, tu)))
    assert torch.allclose(terms["guided"], 2.0 * mse(pu + 4 * (pc - pu), tu + 4 * (tc - tu)))
    assert torch.allclose(terms["direction"], 3.0 * mse(pc - pu, tc - tu))
    plain = guided_terms((pc, None), (tc, None), FinetuneObjective())
    assert set(plain) == {"output"} and torch.allclose(plain["output"], mse(pc, tc))


def test_objective_validation_and_level_draws() -> None:
    for bad in (
        dict(guidance=-1.0),
        dict(level_mode="some"),
        dict(on_policy=0.5),
        dict(on_policy_steps=0),
        dict(direction_weight=-1.0),
    ):
        with pytest.raises(ConfigError):
            FinetuneObjective(**bad).validate()  # type: ignore[arg-type]
    obj = FinetuneObjective(level_mode="draw", seed=3)
    draws = [obj.draw(["a", "b", "c"], i) for i in range(60)]
    assert all(len(d) == 1 for d in draws) and {d[0] for d in draws} == {"a", "b", "c"}
    assert draws == [obj.draw(["a", "b", "c"], i) for i in range(60)]  # a pure function of (seed, index)
    assert FinetuneObjective().draw(["a", "b"], 5) == ["a", "b"]


def test_euler_to_follows_a_constant_velocity() -> None:
    x1 = torch.randn(3, 4, 2)
    v = torch.randn(3, 4, 2)
    t = torch.tensor([0.0, 0.5, 0.9])
    out = euler_to(lambda x, now: (v, v), x1, t, steps=3, guidance=4.0)
    assert torch.allclose(out, x1 - (1 - t)[:, None, None] * v, atol=1e-6)


def test_unconditional_twin_is_the_empty_prompt(toy: ToyTeacher) -> None:
    data = ToyDistillData(toy, 3, caption_dropout=0.0)
    batch = data.batch(0)
    twin = data.unconditional(batch)
    emb, mask = toy.encode_prompts([""] * 3)
    assert torch.equal(twin["encoder_hidden_states"], emb) and torch.equal(twin["encoder_hidden_states_mask"], mask)
    assert twin["hidden_states"] is batch["hidden_states"] and twin["timestep"] is batch["timestep"]


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_multi_level_guided_finetune_trains_every_level(toy: ToyTeacher, tmp_path: Path) -> None:
    model = toy.transformer
    addon = PruningAddon.from_plan(model, _plan(model))
    before = {k: [p.clone() for p in m.parameters()] for k, m in addon.students.items()}
    obj = FinetuneObjective(guidance=4.0, direction_weight=1.0, levels=("big",))
    config = DistillConfig(steps=6, batch_size=2, lr=1e-3, checkpoint_every=0, log_every=1)
    finetune(model, addon, ToyDistillData(toy, 2), config, tmp_path / "ft", level="small", objective=obj)
    rows = _rows(tmp_path / "ft")
    assert set(rows[0]["terms"]) == {f"{lv}/{t}" for lv in ("small", "big") for t in ("output", "guided", "direction")}
    first, last = rows[0]["terms"], rows[-1]["terms"]
    assert last["big/guided"] < first["big/guided"] and last["small/guided"] < first["small/guided"]
    for key in (student_key(A), student_key(B)):  # both levels' modules trained
        assert any(not torch.equal(p, q) for p, q in zip(addon.students[key].parameters(), before[key], strict=False))
    prov = addon.provenance["finetune"]
    assert prov["levels"] == ["small", "big"] and prov["objective"]["guidance"] == 4.0


def test_draw_mode_trains_one_level_per_batch(toy: ToyTeacher, tmp_path: Path) -> None:
    model = toy.transformer
    addon = PruningAddon.from_plan(model, _plan(model))
    obj = FinetuneObjective(levels=("big",), level_mode="draw")
    config = DistillConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=0, log_every=1)
    finetune(model, addon, ToyDistillData(toy, 2), config, tmp_path / "ft", level="small", objective=obj)
    drawn = [obj.draw(["small", "big"], i) for i in range(4)]
    assert [list(r["terms"]) for r in _rows(tmp_path / "ft")] == [[f"{d[0]}/output"] for d in drawn]


def test_on_policy_replaces_a_share_of_the_inputs(toy: ToyTeacher) -> None:
    model = toy.transformer
    addon = PruningAddon.from_plan(model, _plan(model))
    data = ToyDistillData(toy, 4)
    apply_addon(model, addon)
    try:
        obj = FinetuneObjective(guidance=4.0, on_policy=0.5, on_policy_steps=2).validate()
        step = FinetuneStep(
            model, level_modules(addon, "big"), "big", {}, objective=obj, unconditional=data.unconditional
        )
        batch = data.batch(0)
        mixed, twin = step._on_policy(batch, data.unconditional(batch), "big")
        assert not torch.equal(mixed["hidden_states"][:2], batch["hidden_states"][:2])
        assert torch.equal(mixed["hidden_states"][2:], batch["hidden_states"][2:])
        assert twin["hidden_states"] is mixed["hidden_states"]
        assert torch.isfinite(step(**batch)["guided"])
    finally:
        remove_addon(model)


def test_refusals(toy: ToyTeacher, tmp_path: Path) -> None:
    from test_distill import _plan as tiny_plan
    from tiny_models import build_tiny

    case = build_tiny("qwenimage")
    plan = tiny_plan(case)
    addon = PruningAddon.from_plan(case.model, plan)
    config = DistillConfig(steps=1, batch_size=2, checkpoint_every=0)
    with pytest.raises(ConfigError, match="unconditional"):  # a data source without twins cannot pair
        finetune(
            case.model,
            addon,
            FixedData(case),
            config,
            tmp_path / "a",
            level="all",
            objective=FinetuneObjective(guidance=4.0),
        )
    with pytest.raises(ConfigError, match="checkpointing"):
        finetune(
            case.model,
            addon,
            FixedData(case),
            DistillConfig(steps=1, batch_size=2, gradient_checkpointing=True),
            tmp_path / "b",
            level="all",
            objective=FinetuneObjective(levels=("early",)),
        )
    with pytest.raises(ConfigError):
        finetune(
            case.model,
            addon,
            FixedData(case),
            config,
            tmp_path / "c",
            level="all",
            objective=FinetuneObjective(levels=("nope",)),
        )


def test_objective_needs_an_active_term_and_cli_flags_need_the_finetune_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no active term"):
        FinetuneObjective(output_weight=0.0).validate()
    with pytest.raises(ConfigError, match="no active term"):
        FinetuneObjective(guidance=4.0, output_weight=0.0, guided_weight=0.0).validate()
    FinetuneObjective(guidance=4.0, output_weight=0.0).validate()  # the guided term alone is a valid objective
    from ppcl.cli.main import main

    code = main(
        ["-q", "distill", "--plan", "docs/example-report/plan", "--out", str(tmp_path / "d"), "--direction-weight", "2"]
    )
    assert code == 2 and not (tmp_path / "d").exists()
