"""The add-on's model card is a Hub model card (issue 16, item 5): YAML metadata through ``huggingface_hub.ModelCard``
(``base_model`` when the base is a Hub id, ``library_name: ppcl``, tags, ``pipeline_tag``), no local paths, metrics
tables labelled by what their rows are."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ppcl.addon import PruningAddon
from tiny_models import build_tiny, two_span_plan


def _saved(tmp_path: Path, name_or_path: str, name: str = "flux", metrics: dict | None = None) -> ModelCard:
    case = build_tiny(name)
    case.model.config["_name_or_path"] = name_or_path
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    if metrics is not None:
        addon.metrics = metrics
    folder = addon.save_pretrained(tmp_path / "addon")
    return ModelCard.load(folder / "README.md")


def test_card_has_hub_metadata_for_a_hub_base(tmp_path: Path) -> None:
    card = _saved(tmp_path, "black-forest-labs/FLUX.1-dev")
    data = card.data.to_dict()
    assert data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert data["library_name"] == "ppcl" and data["pipeline_tag"] == "text-to-image"
    assert {"ppcl", "pruning", "diffusers", "flux"} <= set(data["tags"])
    assert "# PPCL pruning add-on for black-forest-labs/FLUX.1-dev" in card.text


@pytest.mark.parametrize("base", ["/home/me/models/FLUX.1-dev/transformer", "models/flux-local", ""])
def test_card_never_shows_a_local_path(tmp_path: Path, base: str) -> None:
    if base == "models/flux-local":  # looks like a Hub id, but it is a folder here
        (tmp_path / "models" / "flux-local").mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        card = _saved(tmp_path, base)
    finally:
        os.chdir(cwd)
    assert "base_model" not in card.data.to_dict()
    assert card.data.to_dict()["library_name"] == "ppcl"
    assert "/home/me" not in card.content and "flux-local" not in card.content
    assert "# PPCL pruning add-on for FluxTransformer2DModel" in card.text


def test_video_families_are_tagged_text_to_video(tmp_path: Path) -> None:
    assert _saved(tmp_path, "Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan").data.to_dict()["pipeline_tag"] == "text-to-video"


def test_metrics_keyed_by_replacement_are_not_labelled_as_levels(tmp_path: Path) -> None:
    """``metrics.depth_loss`` maps replacement ids to losses: its table's rows are metrics, its columns the ids
    (it was headed "level")."""
    card = _saved(tmp_path, "", metrics={"depth_loss": {"depth:1-3": 0.25, "depth:3-5": 0.5}})
    assert "| metric | depth:1-3 | depth:3-5 |" in card.text
    assert "| depth_loss | 0.25 | 0.5 |" in card.text
    levels = _saved(tmp_path / "l", "", metrics={"a": {"nmse": 0.1}, "b": {"nmse": 0.2}})
    assert "| level | nmse |" in levels.text
