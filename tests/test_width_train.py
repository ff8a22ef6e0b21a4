"""Width distillation (least squares + gradient training) and the end-to-end fine-tune, on tiny real models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ppcl.addon import PruningAddon, student_key
from ppcl.arch import get_spec
from ppcl.distill import (
    FLOW_TARGET_KEY,
    DistillConfig,
    WidthStep,
    distill_width,
    finetune,
    init_width_projections,
    width_positions,
)
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, FFNLinear, Level, PruningPlan, Span, TextRun
from ppcl.runtime import apply_addon, remove_addon
from test_width import _case
from tiny_models import TinyCase, build_tiny


class FixedData:
    """``n`` fixed batches from the tiny model's input maker, cycled by step (optionally with a flow target)."""

    def __init__(self, case: TinyCase, n: int = 2, flow: bool = False) -> None:
        self.case, self.n, self.flow = case, n, flow

    def batch(self, step: int) -> dict[str, Any]:
        batch = self.case.make_inputs(step % self.n)
        if self.flow:
            batch[FLOW_TARGET_KEY] = torch.zeros_like(batch["hidden_states"][..., :16])
        return batch

    def describe(self) -> dict[str, Any]:
        return {"source": "tiny", "n": self.n}


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _depth_width_plan(case: TinyCase) -> PruningPlan:
    """Depth span [2, 4) inside text run [1, 5) (block 3 skipped); the student at 2 is text-pruned and its image FFN
    linear; FFN of block 5 (both streams). Level "dw" holds all of it."""
    spec = get_spec(case.model)
    depth, run = DepthReplacement(Span(2, 4)), TextRun(Span(1, 5), skip=(3,))
    reps = [depth, run, FFNLinear(2, ("image",)), FFNLinear(5)]
    return PruningPlan(
        spec.name,
        type(case.model).__name__,
        (6,),
        reps,
        [Level("dw", tuple(r.id for r in reps))],
        protect_first=1,
        protect_last=0,
    ).validate()


def _config(steps: int, **kwargs: Any) -> DistillConfig:
    base = {"steps": steps, "lr": 2e-3, "schedule": "constant", "batch_size": 2, "log_every": 1, "checkpoint_every": 0}
    return DistillConfig(**{**base, **kwargs})


@pytest.mark.parametrize("name", ["qwenimage", "qwenimage_edit", "flux", "sd3"])
def test_least_squares_init_recovers_planted_maps(name: str) -> None:
    case, plan, exact = _case(name)
    inputs = case.make_inputs(100)
    with torch.no_grad():
        teacher = case.forward(inputs)
    addon = PruningAddon.from_plan(case.model, plan)
    batches = [case.make_inputs(seed) for seed in range(6)]  # > D + 1 text tokens: a well-determined fit
    errors = init_width_projections(case.model, addon, "all", batches, ridge=1e-9)
    assert set(errors) == set(exact)
    assert all(e < 1e-3 for e in errors.values()), errors
    apply_addon(case.model, addon, "all")
    with torch.no_grad():
        pruned = case.forward(inputs)  # unseen inputs, no gradient step
        # The non-sequential step sees the same exactness: every width and linear term is ~0.
        losses = WidthStep(case.model, addon, "all")(**inputs)
    remove_addon(case.model)
    assert {k.split("/")[0] for k in losses} == {"width", "linear"}
    assert all(v.item() < 1e-6 for v in losses.values()), losses
    torch.testing.assert_close(pruned, teacher, atol=2e-4, rtol=1e-3)


def test_positions_of_a_level_with_depth_inside_a_run() -> None:
    case = build_tiny("qwenimage")
    positions = {p.index: p for p in width_positions(_depth_width_plan(case), "dw")}
    assert sorted(positions) == [1, 2, 4, 5]
    assert positions[2].student == student_key("depth:2-4") and positions[2].last == 3
    assert positions[2].mode.text == "pruned" and positions[4].mode.text == "last"
    assert not positions[1].trained and positions[5].trained
    with pytest.raises(ConfigError, match="nothing to width-distill"):
        width_positions(
            PruningPlan(
                "qwenimage",
                type(case.model).__name__,
                (6,),
                [DepthReplacement(Span(2, 4))],
                [Level("d", ("depth:2-4",))],
                protect_first=1,
                protect_last=1,
            ),
            "d",
        )


def test_gradient_training_lowers_loss_and_changes_projections_only(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    model = case.model
    plan = _depth_width_plan(case)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addon = PruningAddon.from_plan(model, plan)
    before = {k: v.clone() for k, v in addon.state_dict().items()}
    distill_width(model, addon, FixedData(case), _config(8), tmp_path, "dw", init=False)
    rows = _rows(tmp_path)
    assert len(rows) == 8 and set(rows[0]["terms"]) >= {"width/2", "width/4", "width/5", "linear/text_1_5__out"}
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    after = model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert not hasattr(model, "ppcl")
    changed = {k.split(".")[0] for k, v in addon.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "text_1_5__in_2",
        "text_1_5__in_4",
        "text_1_5__out",
        "ffn_2__image",
        "ffn_5__image",
        "ffn_5__text",
    }  # the depth student stays frozen by default
    saved = PruningAddon.from_pretrained(tmp_path / "addon", model)
    assert saved.provenance["width"]["level"] == "dw" and saved.provenance["width"]["init"] is None
    assert all(torch.equal(v, addon.state_dict()[k]) for k, v in saved.state_dict().items())


def test_joint_training_moves_the_depth_student_too(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, _depth_width_plan(case))
    key = student_key("depth:2-4")
    before = {k: v.clone() for k, v in addon.students[key].state_dict().items()}
    distill_width(case.model, addon, FixedData(case), _config(1), tmp_path, "dw", init_batches=2, train_students=True)
    assert any(not torch.equal(v, before[k]) for k, v in addon.students[key].state_dict().items())
    assert key in addon.provenance["width"]["trained"]


def test_width_init_then_train_records_provenance_and_resume_is_exact(tmp_path: Path) -> None:
    config = _config(4, lr=1e-3, warmup=1, schedule="cosine", checkpoint_every=1, gradient_accumulation=2)

    def run(out: Path, **kwargs: Any) -> Any:
        case = build_tiny("flux")
        _, plan, _ = _case("flux")
        addon = PruningAddon.from_plan(case.model, plan)
        return distill_width(case.model, addon, FixedData(case, n=3), config, out, "all", init_batches=4, **kwargs)

    full = run(tmp_path / "full")
    assert full.provenance["width"]["init"]["rel_error"].keys() == full.metrics["width_init_rel_error"].keys()
    run(tmp_path / "cut", stop_at=2)
    assert not (tmp_path / "cut" / "addon").exists()
    resumed = run(tmp_path / "cut", resume=True)
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in _rows(tmp_path / "full")]


def test_finetune_addon_only_lowers_output_mse_and_keeps_base(tmp_path: Path) -> None:
    case = build_tiny("sd3")
    model = case.model
    spec = get_spec(model)
    reps = [DepthReplacement(Span(1, 3)), FFNLinear(4)]
    plan = PruningPlan(
        spec.name,
        type(model).__name__,
        (6,),
        reps,
        [Level("l", tuple(r.id for r in reps))],
        protect_first=1,
        protect_last=1,
    ).validate()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addon = PruningAddon.from_plan(model, plan)
    finetune(model, addon, FixedData(case, n=1), _config(6, lr=3e-4), tmp_path, "l")
    rows = _rows(tmp_path)
    assert rows[-1]["terms"]["output"] < 0.8 * rows[0]["terms"]["output"], [r["loss"] for r in rows]
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert addon.provenance["finetune"]["standalone"] is False and "standalone" not in addon.provenance


def test_full_finetune_changes_kept_blocks_and_is_standalone(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    model = case.model
    plan = _depth_width_plan(case)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addon = PruningAddon.from_plan(model, plan)
    finetune(model, addon, FixedData(case, flow=True), _config(2), tmp_path, "dw", full=True, flow_matching_weight=0.1)
    after = model.state_dict()
    changed = {k.split(".")[1] for k in base if not torch.equal(after[k], base[k])}
    assert changed == {"0", "1", "4", "5"}  # blocks 2 and 3 are replaced by the depth student at this level
    assert not any(torch.equal(after[k], base[k]) for k in base if k.startswith("transformer_blocks.0.attn.to_q"))
    assert addon.provenance["finetune"]["standalone"] is True and addon.provenance["standalone"]["level"] == "dw"
    assert (tmp_path / "merged" / "config.json").is_file()
    assert "flow_matching" in _rows(tmp_path)[0]["terms"]
    with pytest.raises(ConfigError, match="flow-matching"):
        finetune(
            model,
            PruningAddon.from_plan(model, plan),
            FixedData(case),
            _config(1),
            tmp_path / "x",
            "dw",
            flow_matching_weight=1.0,
        )
