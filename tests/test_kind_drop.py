"""The ``drop`` kind (``ppcl/kinds/drop.py``, issue 15's proof that a new kind is one file): blocks removed with no
student. Plan JSON and validation, the runtime against an independent hand-edited model, merge ≡ apply with a stock
reload, the add-on round trip, parameter counts, and how distillation treats it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.distill import CalibrationData, DistillConfig, distill_depth
from ppcl.errors import ArtefactError, ConfigError
from ppcl.kinds import DropSpan
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span, TextRun
from ppcl.runtime import apply_addon, merge, set_level
from tiny_models import build_tiny


class _Skip(nn.Module):
    """A FLUX.1 block that does nothing: both block kinds take (hidden_states, encoder_hidden_states, ...) and return
    (encoder_hidden_states, hidden_states). Written without ArchSpec, as the reference."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *a: Any, **k: Any) -> Any:
        return encoder_hidden_states, hidden_states


def _plan() -> PruningPlan:
    """Tiny FLUX.1 (3 double + 3 single): level ``d`` drops double block 1; ``b`` also replaces singles [3:5]."""
    reps = [DropSpan(Span(1, 2)), DepthReplacement(Span(3, 5))]
    levels = [Level("d", (reps[0].id,)), Level("b", (reps[0].id, reps[1].id))]
    return PruningPlan("flux", "FluxTransformer2DModel", (3, 3), reps, levels, protect_first=1, protect_last=1)


def test_plan_json_round_trip_and_counts(tmp_path: Path) -> None:
    plan = _plan().validate()
    folder = plan.save(tmp_path / "plan")
    loaded = PruningPlan.load(folder)
    assert loaded.to_json() == plan.to_json()
    (drop,) = [r for r in loaded.replacements if r.kind == "drop"]
    assert drop == DropSpan(Span(1, 2)) and drop.id == "drop:1-2"
    assert loaded.kept_blocks("d") == [0, 2, 3, 4, 5] and loaded.kept_blocks("b") == [0, 2, 3, 5]
    case = build_tiny("flux")
    per_block = [sum(p.numel() for p in b.parameters()) for b in (*case.model.transformer_blocks,
                                                                    *case.model.single_transformer_blocks)]  # fmt: skip
    count = plan.param_count(dict(case.model.config), "d")
    assert count.total - count.after == per_block[1]  # the whole block: nothing stands in for it
    written = json.loads((folder if folder.is_file() else next(folder.glob("*.json"))).read_text())
    assert {"kind": "drop", "id": "drop:1-2", "start": 1, "stop": 2, "inclusive": [1, 1]} in written["replacements"]


def test_bad_drops_are_refused() -> None:
    with pytest.raises(ConfigError, match="crosses a block-stack boundary"):
        PruningPlan("flux", "FluxTransformer2DModel", (3, 3), [DropSpan(Span(2, 4))], [], 1, 1).validate()
    with pytest.raises(ConfigError, match="protected"):
        PruningPlan("flux", "FluxTransformer2DModel", (3, 3), [DropSpan(Span(0, 2))], [], 1, 1).validate()
    overlap = [DropSpan(Span(1, 2)), DepthReplacement(Span(1, 3))]
    level = Level("x", tuple(r.id for r in overlap))
    with pytest.raises(ConfigError, match="overlap"):
        PruningPlan("flux", "FluxTransformer2DModel", (3, 3), overlap, [level], 1, 1).validate()
    run = [DropSpan(Span(2, 3)), TextRun(Span(1, 4))]
    with pytest.raises(ConfigError, match="overlap"):
        PruningPlan("qwenimage", "QwenImageTransformer2DModel", (6,), run, [Level("x", (run[0].id, run[1].id))], 1, 1
                    ).validate()  # fmt: skip
    with pytest.raises(ConfigError, match="needs a Span"):
        DropSpan((1, 2))  # type: ignore[arg-type]
    data = _plan().to_json()
    data["replacements"][0]["inclusive"] = [1, 2]  # disagrees with start/stop
    with pytest.raises(ArtefactError, match="disagree"):
        PruningPlan.from_json(data)


@torch.no_grad()
def test_runtime_merge_and_addon_round_trip(tmp_path: Path) -> None:
    case = build_tiny("flux")
    model, inputs = case.model, case.make_inputs(0)
    original = case.forward(inputs)
    reference = copy.deepcopy(model)
    reference.transformer_blocks[1] = _Skip()
    expected = reference(**inputs, return_dict=False)[0]

    addon = PruningAddon.from_plan(model, _plan().validate())
    assert list(addon.students) == ["depth_3_5"]  # the drop owns no module
    apply_addon(model, addon, "d")
    dropped = case.forward(inputs)
    assert torch.equal(dropped, expected) and not torch.allclose(dropped, original)
    set_level(model, None)
    assert torch.equal(case.forward(inputs), original)

    merged = merge(model, addon, "d")
    assert (merged.config.num_layers, merged.config.num_single_layers) == (2, 3)
    torch.testing.assert_close(merged(**inputs, return_dict=False)[0], dropped, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    stock = type(model).from_pretrained(tmp_path / "merged").eval()  # plain diffusers
    assert torch.equal(stock(**inputs, return_dict=False)[0], merged(**inputs, return_dict=False)[0])

    addon.save_pretrained(tmp_path / "addon")
    twin = build_tiny("flux").model
    apply_addon(twin, PruningAddon.from_pretrained(tmp_path / "addon", twin), "b")
    set_level(model, "b")
    assert torch.equal(twin(**inputs, return_dict=False)[0], case.forward(inputs))


def test_distillation_trains_the_students_and_has_nothing_to_train_for_drops(tmp_path: Path) -> None:
    from ppcl.arch import get_spec
    from ppcl.data.calibration import assemble

    case = build_tiny("flux")
    addon = PruningAddon.from_plan(case.model, _plan().validate())
    calibration = assemble(get_spec(case.model), case.model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    data = CalibrationData(calibration, 2)
    with pytest.raises(ConfigError, match="nothing to distill"):
        distill_depth(case.model, addon, data, DistillConfig(steps=1, batch_size=2), tmp_path / "d", level="d")
    for mode in ("nonsequential", "sequential"):
        before = {k: v.clone() for k, v in addon.students.state_dict().items()}
        config = DistillConfig(steps=2, batch_size=2, lr=1e-3, mode=mode)
        distill_depth(case.model, addon, data, config, tmp_path / mode, level="b")
        after = addon.students.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), mode
