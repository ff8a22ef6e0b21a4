"""A LoRA trained with a pruned level active (peft targets the students too) saves and loads with its student layers
(issue 16, item 2). ppcl hides ``ppcl.*`` from ``state_dict()`` so that a base checkpoint stays pure; peft and
diffusers read adapters through ``state_dict()``, so they saved 0 of the students' LoRA layers and loaded none."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ppcl.addon import PruningAddon
from ppcl.runtime import apply_addon, load_lora, lora_state_dict, set_level
from test_addon_width import _perturb, width_plan
from tiny_models import build_tiny, two_span_plan


def test_a_level_lora_round_trips_with_its_student_layers(tmp_path: Path) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    case = build_tiny("flux")
    model, inputs = case.model.requires_grad_(False), case.make_inputs(0)
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    addon.save_pretrained(tmp_path / "addon")  # before the LoRA: the add-on holds plain students
    apply_addon(model, addon, "b")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained LoRA: nonzero B everywhere, students included
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    with torch.no_grad():
        expected = case.forward(inputs)
    assert not any(k.startswith("ppcl.") for k in get_peft_model_state_dict(model))  # what peft alone keeps
    state = lora_state_dict(model)
    students = [k for k in state if k.startswith("ppcl.")]
    assert len(students) == 8 and len(state) == 32  # 2 students x (to_q, to_k) x (A, B), + 24 base tensors
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=state)

    fresh = build_tiny("flux").model.requires_grad_(False)
    apply_addon(fresh, PruningAddon.from_pretrained(tmp_path / "addon", fresh), "b")
    load_lora(fresh, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-6)
        set_level(fresh, None)  # the base's LoRA layers are there too
        set_level(model, None)
        torch.testing.assert_close(fresh(**inputs, return_dict=False)[0], case.forward(inputs), rtol=0, atol=1e-6)
    assert not any(k.startswith("ppcl.") for k in fresh.state_dict())  # base checkpoints stay pure


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
def test_a_lora_on_the_modulation_layers_counts_at_width_levels(name: str) -> None:
    """A base LoRA on the blocks' modulation linears (``img_mod.1`` / ``norm1.linear``: "all linear layers" LoRAs hit
    them) counts at width levels as on the base: the same outputs as the base with the LoRA fused into its weights.
    FFN-mapped blocks compute only some modulation rows; that read the base weight directly, skipping the LoRA."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    case = build_tiny(name)
    model, inputs = case.model.requires_grad_(False), case.make_inputs(0)
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    fused = copy.deepcopy(model)
    targets = ["img_mod.1", "txt_mod.1", "norm1.linear", "norm1_context.linear"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert layers
    for name_, layer in layers.items():  # the reference: the same deltas added to a plain copy's weights
        fused.get_submodule(name_).weight.add_(layer.get_delta_weight("default"))
    apply_addon(model, addon)
    apply_addon(fused, addon)
    for level in ("w", "dw"):
        set_level(model, level)
        set_level(fused, level)
        torch.testing.assert_close(case.forward(inputs), fused(**inputs, return_dict=False)[0], rtol=0, atol=1e-5)
