"""Format stability: an add-on written by an earlier ppcl (format_version 1, committed under tests/fixtures/addon_v1,
made by tests/fixtures/make_addon_v1.py) loads with the current ppcl and reproduces the outputs recorded then."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppcl.addon import ADDON_FILE, PruningAddon
from ppcl.runtime import apply_addon, merge, remove_addon, set_level

FIXTURE = Path(__file__).parent / "fixtures" / "addon_v1"
IMG_SHAPES = [(1, 2, 2)]  # as in make_addon_v1.py: 2x2 patches
TOL = 1e-6


def _base() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    config = json.loads((FIXTURE / "base" / "config.json").read_text())
    model = QwenImageTransformer2DModel.from_config(config)
    state = load_file(str(FIXTURE / "base" / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _run(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    with torch.no_grad():
        return model(**inputs, img_shapes=IMG_SHAPES, return_dict=False)[0]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


def test_fixture_is_a_version_1_addon_and_small() -> None:
    manifest = json.loads((FIXTURE / ADDON_FILE).read_text())
    assert manifest["format_version"] == 1
    assert [lv["name"] for lv in manifest["plan"]["levels"]] == ["a", "b"]
    assert sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file()) < 100_000


def test_addon_v1_reproduces_the_recorded_outputs(expected: dict[str, torch.Tensor]) -> None:
    model = _base()
    torch.testing.assert_close(_run(model, expected), expected["output.base"], rtol=0, atol=TOL)
    addon = PruningAddon.from_pretrained(FIXTURE, model)
    assert addon.level_names == ["a", "b"]
    assert {p.dtype for p in addon.parameters()} == {torch.float32}
    apply_addon(model, addon)
    for level in addon.level_names:
        set_level(model, level)
        out = _run(model, expected)
        torch.testing.assert_close(out, expected[f"output.{level}"], rtol=0, atol=TOL)
        assert (out - expected["output.base"]).abs().max() > 1e-3  # the level really changes the model
    set_level(model, None)
    torch.testing.assert_close(_run(model, expected), expected["output.base"], rtol=0, atol=TOL)
    remove_addon(model)
    torch.testing.assert_close(_run(model, expected), expected["output.base"], rtol=0, atol=TOL)


@pytest.mark.parametrize("level", ["a", "b"])
def test_addon_v1_merges_to_the_recorded_outputs(expected: dict[str, torch.Tensor], level: str) -> None:
    model = _base()
    merged = merge(model, PruningAddon.from_pretrained(FIXTURE, model), level).eval()
    torch.testing.assert_close(_run(merged, expected), expected[f"output.{level}"], rtol=0, atol=TOL)
