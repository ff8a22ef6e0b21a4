"""Runtime: apply_addon / set_level / disabled / remove_addon on tiny real diffusers models."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon, student_key
from ppcl.arch import get_spec
from ppcl.errors import AddonMismatchError, ConfigError, PPCLError
from ppcl.modules.dispatch import is_dispatched
from ppcl.plan import PruningPlan
from ppcl.runtime import active_level, apply_addon, disabled, remove_addon, set_level
from tiny_models import TinyCase, build_tiny, two_span_plan


def make_plan(model: nn.Module) -> PruningPlan:
    return two_span_plan(model)


def make_addon(model: nn.Module) -> PruningAddon:
    addon = PruningAddon.from_plan(model, make_plan(model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():  # trained students differ from the teacher blocks they were copied from
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return addon


class _Passthrough(nn.Module):
    """Reference for a skipped block, written independently of ArchSpec: every supported block takes
    (hidden_states, encoder_hidden_states, ...) and returns (encoder_hidden_states, hidden_states), except Wan's and
    FLUX.2's single blocks (the joint sequence), which return hidden_states alone, and HunyuanVideo-1.5's, which
    return (hidden_states, encoder_hidden_states)."""

    def __init__(self, model_class: str, attr: str) -> None:
        super().__init__()
        self.model_class, self.attr = model_class, attr

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        if self.model_class == "WanTransformer3DModel" or (
            self.model_class == "Flux2Transformer2DModel" and self.attr == "single_transformer_blocks"
        ):
            return hidden_states
        if self.model_class == "HunyuanVideo15Transformer3DModel":  # image first
            return hidden_states, encoder_hidden_states
        return encoder_hidden_states, hidden_states


def _manual_reference(base: nn.Module, addon: PruningAddon, level: str, inputs: dict[str, Any]) -> torch.Tensor:
    """The level's output computed on a copy of the plain base whose block lists are edited by hand."""
    model = copy.deepcopy(base)
    spec = get_spec(model)
    for rep in addon.plan.replacements_of(level):
        for i in rep.span.blocks:
            attr, local = spec.locate(model, i)
            passthrough = _Passthrough(type(model).__name__, attr)
            replacement = addon.students[student_key(rep.id)] if i == rep.span.start else passthrough
            getattr(model, attr)[local] = replacement
    return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def test_levels_switch_and_match_a_manual_computation(tiny_case: TinyCase) -> None:
    model, inputs = tiny_case.model, tiny_case.make_inputs(0)
    original = tiny_case.forward(inputs)
    plain = copy.deepcopy(model)
    addon = make_addon(model)
    assert apply_addon(model, addon) is model
    assert active_level(model) is None
    assert torch.equal(tiny_case.forward(inputs), original)
    outputs = {}
    for level in ("a", "b"):
        set_level(model, level)
        assert active_level(model) == level
        outputs[level] = tiny_case.forward(inputs)
        torch.testing.assert_close(outputs[level], _manual_reference(plain, addon, level, inputs), rtol=0, atol=1e-5)
        assert not torch.allclose(outputs[level], original)
    assert not torch.allclose(outputs["a"], outputs["b"])
    with disabled(model):
        assert active_level(model) is None
        assert torch.equal(tiny_case.forward(inputs), original)
    assert active_level(model) == "b"
    assert torch.equal(tiny_case.forward(inputs), outputs["b"])
    set_level(model, None)
    assert torch.equal(tiny_case.forward(inputs), original)


@torch.no_grad()
def test_deepcopy_of_an_applied_model_is_independent() -> None:
    case = build_tiny("flux")
    model, inputs = case.model, case.make_inputs(0)
    original = case.forward(inputs)
    addon = make_addon(model)
    apply_addon(model, addon, "b")
    at_b = case.forward(inputs)
    twin = copy.deepcopy(model)
    set_level(twin, None)
    assert active_level(model) == "b"
    assert torch.equal(twin(**inputs, return_dict=False)[0], original)
    assert torch.equal(case.forward(inputs), at_b)
    assert twin.ppcl is not addon.students
    remove_addon(twin)
    assert not any(k.startswith("ppcl.") for k in model.state_dict())  # the original keeps its hooks
    assert torch.equal(case.forward(inputs), at_b)
    # The original's block still dispatches; the twin's is a plain diffusers block again.
    assert is_dispatched(get_spec(model).block(model, 1)) and not is_dispatched(get_spec(twin).block(twin, 1))


def test_disabled_restores_after_an_exception() -> None:
    model = build_tiny("qwenimage").model
    apply_addon(model, make_addon(model), "a")
    with pytest.raises(RuntimeError, match="boom"), disabled(model):
        raise RuntimeError("boom")
    assert active_level(model) == "a"


def test_remove_restores_the_exact_original(tiny_case: TinyCase) -> None:
    model, inputs = tiny_case.model, tiny_case.make_inputs(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = tiny_case.forward(inputs)
    addon = make_addon(model)
    apply_addon(model, addon, "b")
    assert model.ppcl is addon.students
    assert remove_addon(model) is addon
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all("forward" not in block.__dict__ for block in get_spec(model).blocks(model))
    assert not hasattr(model, "ppcl") and not hasattr(model, "_ppcl_state")
    with torch.no_grad():
        assert torch.equal(tiny_case.forward(inputs), original)
    with pytest.raises(PPCLError, match="No add-on is applied"):
        set_level(model, "a")


def test_state_dict_hides_the_addon_and_strict_loading_works() -> None:
    model = build_tiny("sd3").model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_addon(model, make_addon(model), "b")
    assert any(name.startswith("ppcl.") for name, _ in model.named_parameters())
    assert not any(k.startswith("ppcl.") for k in model.state_dict())
    assert list(model.state_dict()) == list(base)
    model.load_state_dict(base, strict=True)
    wrapper = nn.ModuleDict({"transformer": model})  # keys of a parent module carry a prefix
    wrapper.load_state_dict({f"transformer.{k}": v for k, v in base.items()}, strict=True)
    assert not any(".ppcl." in k for k in wrapper.state_dict())


def test_errors_for_double_apply_unknown_level_and_wrong_base() -> None:
    model = build_tiny("qwenimage").model
    addon = make_addon(model)
    with pytest.raises(ConfigError, match=r"no level 'zzz'.*\['a', 'b'\]"):
        apply_addon(model, addon, "zzz")
    assert not hasattr(model, "ppcl")  # a failed apply changes nothing
    apply_addon(model, addon, "a")
    with pytest.raises(ConfigError, match="already applied"):
        apply_addon(model, addon, "a")
    with pytest.raises(ConfigError, match=r"no level 'zzz'.*\['a', 'b'\]"):
        set_level(model, "zzz")
    sd35 = build_tiny("sd35").model
    with pytest.raises(AddonMismatchError):
        apply_addon(sd35, make_addon(build_tiny("sd3").model))
    assert "forward" not in get_spec(sd35).block(sd35, 1).__dict__


def test_training_updates_reach_the_addon_with_gradient_checkpointing() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    model.requires_grad_(False)
    addon = make_addon(model)
    apply_addon(model, addon, "b")
    model.train()
    plain = case.forward(inputs)
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in addon.parameters()]
    assert all(g.abs().sum() > 0 for g in grads[:5])
    for p in addon.parameters():
        p.grad = None
    model.enable_gradient_checkpointing()  # blocks are now called positionally through torch.utils.checkpoint
    checkpointed = case.forward(inputs)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    checkpointed.square().mean().backward()
    for g, p in zip(grads, addon.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), disabled(model):
        teacher = case.forward(inputs)
    assert not torch.allclose(teacher, plain)


def test_a_peft_lora_on_the_base_keeps_working() -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig

    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    addon = make_addon(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    with torch.no_grad():
        lora_base = case.forward(inputs)
        apply_addon(model, addon, "b")
        at_level = case.forward(inputs)
        assert torch.isfinite(at_level).all() and not torch.allclose(at_level, lora_base)
        set_level(model, None)
        assert torch.equal(case.forward(inputs), lora_base)
    remove_addon(model)
    with torch.no_grad():
        assert torch.equal(case.forward(inputs), lora_base)
