"""Width maps of a merged model run in the model's dtype (issue 16, item 8): a bf16 depth+width merge kept its
trained float32 projections, so every width-modified block computed them in float32 (on an H200, depth+width Qwen-Image
was slower than depth-only: 185.8 vs 182.4 ms). ``projection_dtype=torch.float32`` keeps the old behaviour."""

from __future__ import annotations

from pathlib import Path

import torch

from ppcl.addon import PruningAddon
from ppcl.modules.projection import ResidualLinear
from ppcl.runtime import apply_addon, load_merged, merge, save_merged
from test_addon_width import _perturb, width_plan
from tiny_models import build_tiny


def _maps(model: torch.nn.Module) -> list[ResidualLinear]:
    return [m for m in model.modules() if isinstance(m, ResidualLinear)]


@torch.no_grad()
def test_merged_width_maps_take_the_models_dtype(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    model = case.model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in case.make_inputs(0).items()}  # fmt: skip
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    assert {p.dtype for m in _maps(addon.students) for p in m.parameters()} == {torch.float32}  # trained masters
    reference = merge(model, addon, "dw", projection_dtype=torch.float32)
    assert {p.dtype for m in _maps(reference) for p in m.parameters()} == {torch.float32}
    merged = merge(model, addon, "dw")
    assert _maps(merged) and {p.dtype for m in _maps(merged) for p in m.parameters()} == {torch.bfloat16}
    apply_addon(model, addon, "dw")
    applied = model(**inputs, return_dict=False)[0]
    out = merged(**inputs, return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), applied.float(), rtol=0, atol=0.05)  # bf16 rounding of the maps
    for kept, folder in ((merged, tmp_path / "bf16"), (reference, tmp_path / "fp32")):
        save_merged(kept, folder)
        loaded = load_merged(folder)
        assert {p.dtype for m in _maps(loaded) for p in m.parameters()} == {
            p.dtype for m in _maps(kept) for p in m.parameters()
        }
        assert torch.equal(loaded(**inputs, return_dict=False)[0], kept(**inputs, return_dict=False)[0])
