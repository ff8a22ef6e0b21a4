"""ControlNet residuals give the same output in add-on and merged modes (issue 16), for FLUX.1, Qwen-Image, SD3/3.5.

The model adds residual ``k(i)`` after base block ``i``. With the add-on applied every base block is still there
(a span's other blocks pass through and still get theirs); a merged model maps the base-indexed residual list onto its
own blocks (``ppcl.runtime.controlnet``), from the merge itself or from the folder's ``ppcl_blocks.json``. Before,
diffusers spaced the residuals over the merged block count: outputs differed by 0.06-0.09.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.kinds import DropSpan
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import (
    BLOCKS_FILE,
    BlockMap,
    ControlNetRemap,
    apply_addon,
    attach_block_map,
    load_merged,
    merge,
    remap_lora_state_dict,
    save_merged,
)
from tiny_models import TinyCase, build_tiny, two_span_plan

# The model's forward keyword per stack, and the residual shape (tokens, width) of the tiny inputs.
ARGUMENTS = {
    "flux": ("controlnet_block_samples", "controlnet_single_block_samples"),
    "qwenimage": ("controlnet_block_samples",),
    "sd3": ("block_controlnet_hidden_states",),
    "sd35": ("block_controlnet_hidden_states",),
}
TOKENS = {"flux": 16, "qwenimage": 16, "sd3": 64, "sd35": 64}


def _addon(model: nn.Module, plan: PruningPlan) -> PruningAddon:
    addon = PruningAddon.from_plan(model, plan)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return addon


def _residuals(case: TinyCase, count: int, seed: int = 5) -> dict[str, list[torch.Tensor]]:
    """``count`` residuals ``(B, N_img, D)`` per stack, as a ControlNet of ``count`` layers would give them."""
    g = torch.Generator().manual_seed(seed)
    width = case.model.inner_dim if hasattr(case.model, "inner_dim") else case.model.config.num_attention_heads * 16
    return {
        arg: [torch.randn(2, TOKENS[case.name], width, generator=g) * 0.5 for _ in range(count)]
        for arg in ARGUMENTS[case.name]
    }


def _run(model: nn.Module, inputs: dict[str, Any], extra: dict[str, Any]) -> torch.Tensor:
    # Fresh lists each call: a pre-hook must never change the caller's own residual list.
    return model(**inputs, **{k: list(v) if isinstance(v, list) else v for k, v in extra.items()}, return_dict=False)[0]


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3", "sd35"])
@pytest.mark.parametrize("count", [2, 3, 6])
def test_addon_and_merged_modes_add_the_same_residuals(name: str, count: int) -> None:
    case = build_tiny(name)
    base, inputs = case.model, case.make_inputs(0)
    addon = _addon(base, two_span_plan(base))
    residuals = _residuals(case, count)
    merged = merge(base, addon, "b")
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "b")
    expected = _run(applied, inputs, residuals)
    given = {k: list(v) for k, v in residuals.items()}
    torch.testing.assert_close(_run(merged, inputs, given), expected, rtol=0, atol=1e-5)
    assert all(len(given[k]) == count for k in given)  # the caller's lists are untouched
    assert not torch.allclose(expected, applied(**inputs, return_dict=False)[0], atol=1e-3)  # residuals matter
    # Without the mapping diffusers spaces the residuals over the merged block count: the old behaviour, measured.
    unmapped = copy.deepcopy(merged)
    for key in [k for k, h in unmapped._forward_pre_hooks.items() if isinstance(h, ControlNetRemap)]:
        del unmapped._forward_pre_hooks[key]
    assert not torch.allclose(_run(unmapped, inputs, residuals), expected, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
def test_width_merges_add_the_same_residuals_as_the_width_level(name: str) -> None:
    """A depth + width level: the width merge (blocks with deleted modules, cut modulation, projections) adds each
    residual to the block the add-on adds it to, as for depth-only merges."""
    from test_addon_width import width_plan

    case = build_tiny(name)
    base, inputs = case.model, case.make_inputs(0)
    addon = _addon(base, width_plan(base))
    residuals = _residuals(case, 3)
    merged = merge(base, addon, "dw")
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "dw")
    expected = _run(applied, inputs, residuals)
    torch.testing.assert_close(_run(merged, inputs, residuals), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, applied(**inputs, return_dict=False)[0], atol=1e-3)  # residuals matter


@torch.no_grad()
def test_flux_repeat_mode_is_mapped_too() -> None:
    """FLUX.1's XLabs ControlNets (``controlnet_blocks_repeat=True``): residual ``i % L`` after double block ``i``."""
    case = build_tiny("flux")
    base, inputs = case.model, case.make_inputs(0)
    addon = _addon(base, two_span_plan(base))
    residuals = {"controlnet_block_samples": _residuals(case, 2)["controlnet_block_samples"]}
    extra = {**residuals, "controlnet_blocks_repeat": True}
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "b")
    expected = _run(applied, inputs, extra)
    merged = merge(base, addon, "b")
    torch.testing.assert_close(_run(merged, inputs, extra), expected, rtol=0, atol=1e-5)
    for key in [k for k, h in merged._forward_pre_hooks.items() if isinstance(h, ControlNetRemap)]:
        del merged._forward_pre_hooks[key]
    assert not torch.allclose(_run(merged, inputs, extra), expected, atol=1e-3)  # diffusers' own repeat differs


@torch.no_grad()
def test_a_real_flux_controlnet_gives_the_same_output_in_both_modes() -> None:
    from diffusers import FluxControlNetModel

    case = build_tiny("flux")
    base, inputs = case.model, case.make_inputs(0)
    torch.manual_seed(2)
    controlnet = FluxControlNetModel.from_transformer(
        base, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
    ).eval()
    for block in controlnet.controlnet_blocks:  # diffusers zero-initialises them: give them something to say
        nn.init.normal_(block.weight, std=0.2)
    nn.init.normal_(controlnet.controlnet_single_blocks[0].weight, std=0.2)
    cond = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(9))
    double, single = controlnet(
        **{k: v for k, v in inputs.items()}, controlnet_cond=cond, conditioning_scale=0.7, return_dict=False
    )
    extra = {"controlnet_block_samples": double, "controlnet_single_block_samples": single}
    addon = _addon(base, two_span_plan(base))
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "b")
    expected = _run(applied, inputs, extra)
    torch.testing.assert_close(_run(merge(base, addon, "b"), inputs, extra), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, applied(**inputs, return_dict=False)[0], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwenimage", "sd3"])
def test_the_mapping_travels_with_the_merged_folder(name: str, tmp_path: Path) -> None:
    """``ppcl_blocks.json``: load_merged (depth-only folders too), load_pipeline's path and a stock load +
    attach_block_map all map the residuals; remap_lora_state_dict works from the folder alone."""
    case = build_tiny(name)
    base, inputs = case.model, case.make_inputs(0)
    plan = two_span_plan(base)
    addon = _addon(base, plan)
    merged = merge(base, addon, "b")
    save_merged(merged, tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / BLOCKS_FILE).read_text())
    assert written["level"] == "b" and written["stacks"][0]["starts"] == [0, 1, 3, 5]
    assert written["stacks"][0]["students"] == [1, 2]
    residuals = _residuals(case, 3)
    expected = _run(merged, inputs, residuals)
    torch.testing.assert_close(_run(load_merged(tmp_path / "merged"), inputs, residuals), expected, rtol=0, atol=0)
    stock = type(base).from_pretrained(str(tmp_path / "merged")).eval()  # diffusers ignores ppcl_blocks.json
    assert not torch.allclose(_run(stock, inputs, residuals), expected, atol=1e-3)
    attach_block_map(stock, BlockMap.load(tmp_path / "merged"))
    torch.testing.assert_close(_run(stock, inputs, residuals), expected, rtol=0, atol=0)

    lora = {f"transformer_blocks.{i}.attn.to_q.lora_A.weight": torch.full((1,), float(i)) for i in range(6)}
    from_plan = remap_lora_state_dict(lora, plan, "b")
    assert remap_lora_state_dict(lora, tmp_path / "merged") == from_plan
    assert remap_lora_state_dict(lora, stock) == from_plan
    assert sorted(from_plan) == [f"transformer_blocks.{j}.attn.to_q.lora_A.weight" for j in (0, 3)]


@torch.no_grad()
def test_a_drop_run_adds_its_residuals_on_the_block_before_it() -> None:
    """Dropped blocks pass through in add-on mode and still get their residuals: the merged block before them
    adds them."""
    case = build_tiny("flux")
    base, inputs = case.model, case.make_inputs(0)
    reps = [DropSpan(Span(1, 2)), DepthReplacement(Span(3, 5))]
    plan = PruningPlan(
        "flux", type(base).__name__, (3, 3), reps, [Level("b", (reps[0].id, reps[1].id))], protect_first=1,
        protect_last=1,
    ).validate()  # fmt: skip
    addon = _addon(base, plan)
    residuals = _residuals(case, 3)
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "b")
    merged = merge(base, addon, "b")
    assert merged.ppcl_block_map.stack("transformer_blocks").source(0) == range(0, 2)
    torch.testing.assert_close(_run(merged, inputs, residuals), _run(applied, inputs, residuals), rtol=0, atol=1e-5)


@torch.no_grad()
def test_residuals_with_no_merged_block_are_refused() -> None:
    """A drop at a stack's start leaves residuals no merged block stands for: refused, never silently lost."""
    case = build_tiny("flux")
    base, inputs = case.model, case.make_inputs(0)
    reps = [DropSpan(Span(3, 4))]  # the first single block
    plan = PruningPlan("flux", type(base).__name__, (3, 3), reps, [Level("d", (reps[0].id,))], protect_first=1,
                       protect_last=1).validate()  # fmt: skip
    merged = merge(base, _addon(base, plan), "d")
    residuals = _residuals(case, 2)
    merged(**inputs, controlnet_block_samples=residuals["controlnet_block_samples"])  # the double stack is whole
    with pytest.raises(ConfigError, match="have no block in the merged model"):
        _run(merged, inputs, residuals)


def test_a_bad_block_map_is_refused(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    base = case.model
    merged = merge(base, _addon(base, two_span_plan(base)), "b")
    folder = save_merged(merged, tmp_path / "merged")
    data = json.loads((folder / BLOCKS_FILE).read_text())
    data["stacks"][0]["starts"] = [0, 3, 1, 5]
    (folder / BLOCKS_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtefactError, match="malformed"):
        load_merged(folder)
    with pytest.raises(ArtefactError, match="does not describe this merged model"):
        attach_block_map(copy.deepcopy(base), BlockMap.from_plan(two_span_plan(base), "b"))
    (folder / BLOCKS_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtefactError, match="not a block map"):
        BlockMap.load(folder)
    assert get_spec(merged).stack_sizes(merged) == [4]


@torch.no_grad()
def test_the_mapping_compiles_with_fullgraph() -> None:
    """``torch.compile(fullgraph=True)`` (eager backend: it fails on any graph break) of a merged model takes its
    ControlNet pre-hook in the graph, and of the applied base the residuals of skipped blocks."""
    case = build_tiny("qwenimage")
    base, inputs = case.model, case.make_inputs(0)
    addon = _addon(base, two_span_plan(base))
    residuals = _residuals(case, 3)
    merged = merge(base, addon, "b")
    expected = _run(merged, inputs, residuals)
    compiled = torch.compile(merged, backend="eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled, inputs, residuals), expected, rtol=0, atol=1e-6)
    apply_addon(base, addon, "b")
    compiled_addon = torch.compile(base, backend="eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled_addon, inputs, residuals), expected, rtol=0, atol=1e-5)
