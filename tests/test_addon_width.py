"""PruningAddon with width replacements: projections from a plan, save/load round trips, broken artefacts, ``ppcl merge``.

Plans mix a depth span, text runs and FFN blocks (tiny models, 6 flat blocks): levels ``d`` (depth only), ``w`` (width
only) and ``dw`` (both; the run then skips the depth-removed block and the span's student is text-pruned).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ppcl
from ppcl.addon import ADDON_FILE, CARD_FILE, FORMAT_VERSION, WEIGHTS_FILE, PruningAddon
from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.modules.projection import ResidualLinear
from ppcl.plan import (
    DepthReplacement,
    FFNLinear,
    Level,
    PruningPlan,
    Span,
    with_width_level,
)
from ppcl.runtime import MERGED_FILE, apply_addon, remove_addon, set_level
from ppcl.runtime.width import projection_keys
from tiny_models import TinyCase, build_tiny

LEVELS: tuple[str | None, ...] = (None, "d", "w", "dw")


def width_plan(model: torch.nn.Module) -> PruningPlan:
    """Levels d / w / dw of a tiny model: one depth span, one text run and FFN blocks (see the module docstring)."""
    spec = get_spec(model)
    if spec.name == "flux":
        # Three double blocks then three single blocks: the run uses the double ones, the span the single ones.
        depth, run, ffns, protect = DepthReplacement(Span(3, 5)), (0, 2), [1], (0, 1)
    else:
        # SD3's last block has no text FFN, so block 5 replaces its image FFN only.
        last = FFNLinear(5, ("image",)) if spec.name.startswith("sd3") else 5
        depth, run, ffns, protect = DepthReplacement(Span(2, 4)), (1, 4), [2, last], (1, 1)
    plan = PruningPlan(
        spec.name,
        type(model).__name__,
        tuple(spec.stack_sizes(model)),
        [depth],
        [Level("d", (depth.id,))],
        protect_first=protect[0],
        protect_last=protect[1],
    )
    plan = with_width_level(plan, "w", [run], ffns)
    return with_width_level(plan, "dw", [run], ffns, base_level="d")


def _perturb(addon: PruningAddon, seed: int = 5) -> None:
    # Fresh students equal teacher blocks and fresh projections are identities; training makes them differ.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _outputs(case: TinyCase, addon: PruningAddon) -> dict[str | None, torch.Tensor]:
    inputs = case.make_inputs(0)
    apply_addon(case.model, addon)
    out = {}
    with torch.no_grad():
        for level in LEVELS:
            set_level(case.model, level)
            out[level] = case.forward(inputs)
    remove_addon(case.model)
    return out


def test_from_plan_builds_identity_projections() -> None:
    model = build_tiny("qwenimage").model
    plan = width_plan(model)
    addon = PruningAddon.from_plan(model, plan)
    want = {key for rep in plan.replacements for key in projection_keys(rep)}
    assert want == {
        "text_1_5__in_2",
        "text_1_5__in_3",
        "text_1_5__in_4",
        "text_1_5__out",
        "text_1_5_dw__in_2",
        "text_1_5_dw__in_4",
        "text_1_5_dw__out",
        "ffn_2__image",
        "ffn_5__image",
        "ffn_5__text",
    }
    assert set(addon.students) == want | {"depth_2_4"}
    for key in want:
        proj = addon.students[key]
        assert isinstance(proj, ResidualLinear) and proj.W.shape == (32, 32) and proj.W.dtype == torch.float32
        assert not proj.W.any() and not proj.b.any() and proj.W.requires_grad
    assert set(addon.projections("text:1-5@dw")) == {"in_2", "in_4", "out"}
    assert set(addon.projections("ffn:5")) == {"image", "text"}
    with pytest.raises(ConfigError, match="no projections"):
        addon.projections("depth:2-4")
    del addon.students["ffn_5__text"]
    with pytest.raises(ConfigError, match="ffn_5__text"):
        addon.manifest()


@pytest.mark.parametrize("name", ["qwenimage", "qwenimage_edit", "flux", "sd3"])
def test_save_load_round_trip_with_width(name: str, tmp_path: Path) -> None:
    case = build_tiny(name)
    model = case.model
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    folder = addon.save_pretrained(tmp_path / "addon")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADDON_FILE, WEIGHTS_FILE, CARD_FILE])

    manifest = json.loads((folder / ADDON_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    projections = {k for k, m in addon.students.items() if isinstance(m, ResidualLinear)}
    assert (
        set(manifest["projections"]) == projections and set(manifest["students"]) == set(addon.students) - projections
    )
    dim = get_spec(model).block(model, 0).attn.to_q.in_features
    for key, entry in manifest["projections"].items():
        assert entry["kind"] == ("text_run" if key.startswith("text_") else "ffn_linear")
        assert entry["shape"] == [dim, dim] and entry["part"] == key.rsplit("__", 1)[1]
    by_level = {lvl["name"]: lvl for lvl in manifest["levels"]}
    assert by_level["w"]["spans"] == [] and len(by_level["dw"]["spans"]) == 1
    assert any(w.startswith("text:") for w in by_level["dw"]["width"])
    assert by_level["dw"]["params"]["after"] < by_level["d"]["params"]["after"]
    card = (folder / CARD_FILE).read_text()
    assert "## Width projections" in card and "width replacements" in card and "ppcl.load_merged" in card

    loaded = PruningAddon.from_pretrained(folder, model)
    assert loaded.plan.to_json() == addon.plan.to_json()
    assert loaded.state_dict().keys() == addon.state_dict().keys()
    for key, value in addon.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    expected, again = _outputs(case, addon), _outputs(case, loaded)
    for level in LEVELS:
        assert torch.equal(again[level], expected[level]), level
    assert not torch.equal(expected["w"], expected[None]) and not torch.equal(expected["dw"], expected["d"])


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = build_tiny("qwenimage").model
    return model, PruningAddon.from_plan(model, width_plan(model)).save_pretrained(tmp_path / "addon")


def test_projection_records_must_match_the_plan(saved: tuple[torch.nn.Module, Path]) -> None:
    model, folder = saved
    manifest = json.loads((folder / ADDON_FILE).read_text())
    broken = json.loads(json.dumps(manifest))
    del broken["projections"]["ffn_5__text"]
    broken["projections"]["ffn_9__image"] = broken["projections"]["ffn_5__image"]
    (folder / ADDON_FILE).write_text(json.dumps(broken))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(folder, model)
    assert "ffn_5__text" in str(err.value) and "ffn_9__image" in str(err.value)

    broken = json.loads(json.dumps(manifest))
    broken["projections"]["text_1_5__out"]["shape"] = [8, 8]
    (folder / ADDON_FILE).write_text(json.dumps(broken))
    with pytest.raises(ArtefactError, match="unusable shape"):
        PruningAddon.from_pretrained(folder, model)


def test_projection_weights_are_checked_strictly(saved: tuple[torch.nn.Module, Path]) -> None:
    from safetensors.torch import load_file, save_file

    model, folder = saved
    tensors = load_file(str(folder / WEIGHTS_FILE))
    del tensors["text_1_5__in_3.W"]
    tensors["text_1_5__in_9.b"] = torch.zeros(32)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(folder, model)
    assert "text_1_5__in_3.W" in str(err.value) and "text_1_5__in_9.b" in str(err.value)


def test_depth_only_addons_keep_format_version_1(tmp_path: Path) -> None:
    model = build_tiny("sd3").model
    plan = width_plan(model)
    depth_only = PruningPlan(
        plan.arch,
        plan.model_class,
        plan.stack_sizes,
        [plan.replacement("depth:2-4")],
        [plan.level("d")],
        protect_first=1,
        protect_last=1,
    )
    folder = PruningAddon.from_plan(model, depth_only).save_pretrained(tmp_path / "addon")
    manifest = json.loads((folder / ADDON_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["projections"] == {}
    assert "Width projections" not in (folder / CARD_FILE).read_text()


def test_cli_merge_of_a_width_level_records_substitutions(tmp_path: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    from ppcl.cli.main import main

    case = build_tiny("qwenimage")
    model = case.model
    model.save_pretrained(str(tmp_path / "model"))
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    addon.save_pretrained(tmp_path / "addon")
    applied = _outputs(case, addon)
    common = ["--addon", str(tmp_path / "addon"), "--model", str(tmp_path / "model")]

    assert main(["-q", "merge", *common, "--level", "dw", "--out", str(tmp_path / "dw")]) == 0
    assert (tmp_path / "dw" / MERGED_FILE).is_file()
    merged = ppcl.load_merged(tmp_path / "dw")
    inputs = case.make_inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs, return_dict=False)[0], applied["dw"], rtol=0, atol=1e-5)

    assert main(["-q", "merge", *common, "--level", "d", "--out", str(tmp_path / "d")]) == 0
    assert not (tmp_path / "d" / MERGED_FILE).exists()
    stock = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "d"), local_files_only=True)
    assert stock.config.num_layers == 5
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs, return_dict=False)[0], applied["d"], rtol=0, atol=1e-5)
