"""Distilling from a low-memory teacher (issue 16, item 4): fp8 layerwise casting and block-level group offload on
the base, set before the add-on is made; the students train in full precision and the teacher is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.data.calibration import assemble
from ppcl.distill import CalibrationData, DistillConfig, distill_depth
from tiny_models import build_tiny, two_span_plan


@pytest.mark.parametrize("how", ["fp8_layerwise_casting", "group_offload"])
def test_distilling_from_a_low_memory_teacher(how: str, tmp_path: Path) -> None:
    case = build_tiny("flux")
    model = case.model
    if how == "fp8_layerwise_casting":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:
        model.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        )
    inputs = case.make_inputs(7)
    with torch.no_grad():
        teacher_out = case.forward(inputs)
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    calibration = assemble(get_spec(model), model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    before = {k: v.clone() for k, v in addon.students.state_dict().items()}
    distill_depth(model, addon, CalibrationData(calibration, 2), DistillConfig(steps=3, batch_size=2, lr=1e-3),
                           tmp_path / "run", level="b")  # fmt: skip
    after = addon.students.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    losses = [float(v) for v in addon.metrics["depth_loss"].values()]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    with torch.no_grad():
        assert torch.equal(case.forward(inputs), teacher_out)  # the teacher, hooks included, is as it was
