"""Chain-aware non-sequential distillation and the ``average`` student initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ppcl.addon import PruningAddon, student_key
from ppcl.arch import get_spec
from ppcl.data.recorder import ActivationRecorder
from ppcl.distill.chain import chain_groups, mix_inputs
from ppcl.distill.depth import DepthStep, depth_replacements
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, remove_addon, set_level
from test_distill import EARLY, LATE, FixedData, _plan, student_inputs
from tiny_models import build_tiny


def _perturbed_addon(model: torch.nn.Module, plan: PruningPlan) -> PruningAddon:
    """An add-on whose early student clearly differs from the block it copies, so chained inputs differ."""
    addon = PruningAddon.from_plan(model, plan)
    with torch.no_grad():
        for p in addon.students[student_key(EARLY)].parameters():
            p.mul_(1.5)
    return addon


def _student_inputs(step: DepthStep, addon: PruningAddon, inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return student_inputs(step, addon, inputs)[0]


def test_chained_input_is_what_the_pruned_model_feeds_the_span() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    plan = _plan(case)
    addon = _perturbed_addon(model, plan)
    apply_addon(model, addon, level="all")
    with torch.no_grad(), ActivationRecorder(model, [3], clone=True) as pruned:
        case.forward(inputs)  # the level "all" at inference: block 3 (the late student) gets the early student's output
    step = DepthStep(model, addon.students, depth_replacements(plan), chain_mix=1.0, plan=plan)
    seen = _student_inputs(step, addon, inputs)
    for arg in ("hidden_states", "encoder_hidden_states"):
        assert torch.allclose(seen[student_key(LATE)][arg], pruned[3][0].kwargs[arg], atol=1e-6), arg
    # The upstream student of the chain still trains on the teacher's own input.
    with torch.no_grad(), ActivationRecorder(model, [1], clone=True) as teacher, __import__("ppcl").disabled(model):
        case.forward(inputs)
    assert torch.equal(seen[student_key(EARLY)]["hidden_states"], teacher[1][0].kwargs["hidden_states"])
    remove_addon(model)


def test_chain_runs_kept_teacher_blocks_between_spans() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(1)
    spec = get_spec(model)
    reps = [DepthReplacement(Span(1, 3)), DepthReplacement(Span(4, 6))]  # block 3 is kept between the spans
    plan = PruningPlan(
        spec.name,
        type(model).__name__,
        tuple(spec.stack_sizes(model)),
        reps,
        [Level("all", ("depth:1-3", "depth:4-6"))],
        protect_first=1,
        protect_last=0,
    ).validate()
    addon = PruningAddon.from_plan(model, plan)
    with torch.no_grad():
        for p in addon.students[student_key("depth:1-3")].parameters():
            p.mul_(1.5)
    apply_addon(model, addon, level="all")
    with torch.no_grad(), ActivationRecorder(model, [4], clone=True) as pruned:
        case.forward(inputs)
    step = DepthStep(model, addon.students, depth_replacements(plan), chain_mix=1.0, plan=plan)
    seen = _student_inputs(step, addon, inputs)
    assert torch.allclose(
        seen[student_key("depth:4-6")]["hidden_states"], pruned[4][0].kwargs["hidden_states"], atol=1e-6
    )
    remove_addon(model)


def test_chain_restarts_at_a_stack_boundary() -> None:
    case = build_tiny("flux")  # EARLY in the double stack, LATE in the single stack
    model, inputs = case.model, case.make_inputs(0)
    plan = _plan(case)
    addon = _perturbed_addon(model, plan)
    apply_addon(model, addon, level=None)
    with torch.no_grad(), ActivationRecorder(model, [3], clone=True) as teacher:
        case.forward(inputs)
    step = DepthStep(model, addon.students, depth_replacements(plan), chain_mix=1.0, plan=plan)
    seen = _student_inputs(step, addon, inputs)
    assert torch.equal(seen[student_key(LATE)]["hidden_states"], teacher[3][0].kwargs["hidden_states"])
    remove_addon(model)


def test_mix_takes_a_share_of_rows_and_detaches_the_chain() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = {"image": torch.randn(4, 3, 2, generator=g), "text": torch.randn(4, 2, 2, generator=g)}
    a = {k: torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    b = {k: torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    mixed = mix_inputs(teacher, [a, b], 0.5)
    for k in teacher:
        assert torch.equal(mixed[k][0], a[k][0]) and torch.equal(mixed[k][1], b[k][1])
        assert torch.equal(mixed[k][2:], teacher[k][2:])
    assert all(torch.equal(mix_inputs(teacher, [a], 0.0)[k], teacher[k]) for k in teacher)

    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    plan = _plan(case)

    def early_grads(mix: float) -> list[torch.Tensor]:
        addon = _perturbed_addon(model, plan)
        apply_addon(model, addon)
        DepthStep(model, addon.students, depth_replacements(plan), chain_mix=mix, plan=plan)(**inputs)[LATE].backward()
        remove_addon(model)
        return [p.grad for p in addon.students[student_key(EARLY)].parameters()]

    # The late loss never reaches the early student: its chained input is detached.
    assert all(grad is None for grad in early_grads(1.0))


def test_chain_groups_follow_the_levels() -> None:
    case = build_tiny("qwenimage")
    plan = _plan(case, [Level("early", (EARLY,)), Level("all", (EARLY, LATE)), Level("again", (LATE, EARLY))])
    groups = chain_groups(plan, depth_replacements(plan))
    assert [[r.id for r in g] for g in groups] == [[EARLY, LATE]]  # single spans have no chain; duplicates once
    with pytest.raises(ConfigError):
        DepthStep(
            case.model, PruningAddon.from_plan(case.model, plan).students, depth_replacements(plan), chain_mix=0.5
        )  # no plan
    with pytest.raises(ConfigError):
        DistillConfig(chain_mix=1.5).validate()


def test_chain_aware_training_runs_and_is_recorded(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    plan = _plan(case)
    addon = PruningAddon.from_plan(case.model, plan)
    config = DistillConfig(steps=3, batch_size=2, lr=1e-3, chain_mix=0.5, checkpoint_every=0, log_every=1)
    distill_depth(case.model, addon, FixedData(case), config, tmp_path / "run")
    prov = PruningAddon.from_pretrained(tmp_path / "run" / "addon", case.model).provenance["depth"]
    assert prov["chain_mix"] == 0.5 and prov["chains"] == [[EARLY, LATE]]
    apply_addon(case.model, addon, level="all")
    assert torch.isfinite(case.forward(case.make_inputs(0))).all()
    set_level(case.model, None)
    remove_addon(case.model)


def test_average_init_is_the_mean_of_the_span() -> None:
    case = build_tiny("qwenimage")
    model = case.model
    spec = get_spec(model)
    plan = _plan(case)
    addon = PruningAddon.from_plan(model, plan, init="average")
    student = addon.students[student_key(LATE)].state_dict()
    blocks = [spec.block(model, i).state_dict() for i in (3, 4)]
    for name, value in student.items():
        assert torch.allclose(value, (blocks[0][name] + blocks[1][name]) / 2, atol=1e-6), name
    rep = next(r for r in addon.plan.replacements if r.id == LATE)
    assert rep.init == "average" and rep.init_blocks == (3, 4) and rep.init_block == 3
    assert "blocks [3, 4]" in rep.describe()


def test_small_batches_still_chain_and_rotate_over_the_levels() -> None:
    teacher = {"image": torch.zeros(1, 2, 2)}
    a, b = {"image": torch.ones(1, 2, 2)}, {"image": torch.full((1, 2, 2), 2.0)}
    # One sample per device: at least one row is chained, and the chain used rotates with the batch index.
    assert torch.equal(mix_inputs(teacher, [a, b], 0.5, offset=0)["image"], a["image"])
    assert torch.equal(mix_inputs(teacher, [a, b], 0.5, offset=1)["image"], b["image"])
