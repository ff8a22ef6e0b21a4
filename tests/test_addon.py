"""PruningAddon: students from a plan, fingerprints, save/load round trips and their failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ppcl.addon import (
    ADDON_FILE,
    CARD_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    PruningAddon,
    fingerprint_of,
    student_key,
)
from ppcl.arch import get_spec
from ppcl.errors import AddonMismatchError, ArtefactError, ConfigError
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, remove_addon
from tiny_models import TinyCase, build_tiny


def make_plan(model: torch.nn.Module, init: str = "first") -> PruningPlan:
    """Spans [1:3] and [3:5] (half-open) of a 6-block tiny model; level "a" uses the first, "b" both."""
    spec = get_spec(model)
    reps = [DepthReplacement(Span(1, 3), init), DepthReplacement(Span(3, 5), init)]  # type: ignore[arg-type]
    levels = [Level("a", (reps[0].id,)), Level("b", (reps[0].id, reps[1].id))]
    return PruningPlan(
        spec.name, type(model).__name__, tuple(spec.stack_sizes(model)), reps, levels, protect_first=1, protect_last=1
    ).validate()


def _perturb(addon: PruningAddon) -> None:
    # Fresh students equal teacher blocks; training makes them differ, which is what the tests must see.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_student_key() -> None:
    assert student_key("depth:3-5") == "depth_3_5"
    assert student_key("my.span/2") == "my_span_2"


@pytest.mark.parametrize("init,source", [("first", 1), ("middle", 1), ("last", 2)])
def test_from_plan_copies_the_init_block(init: str, source: int) -> None:
    case = build_tiny("qwenimage")
    model = case.model
    model.requires_grad_(False)
    addon = PruningAddon.from_plan(model, make_plan(model), init=None if init == "first" else init)
    spec = get_spec(model)
    student = addon.students[student_key("depth:1-3")]
    teacher = spec.block(model, source)
    assert type(student) is type(teacher)
    assert addon.plan.replacement("depth:1-3").init == init  # the override is recorded in the add-on's plan
    for (name, p), (tname, t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        assert name == tname and torch.equal(p, t)
        assert p.requires_grad and p.data_ptr() != t.data_ptr()
    assert "forward" not in student.__dict__
    names = [n for n, _ in addon.named_parameters()]
    assert names[0].startswith("depth_1_3.") and len(names) == len(list(addon.parameters()))


def test_from_plan_on_a_model_with_an_addon_applied_copies_blocks_not_the_model(monkeypatch) -> None:
    """Students made while another add-on is applied are copies of their blocks alone. A dispatched block refers to
    its dispatcher, which reaches the model, its state and every student: deep-copying a block copied all of it (a
    whole 20B model per student at real size)."""
    from ppcl.runtime import apply as runtime_apply

    def refuse(self, memo):
        raise AssertionError("the dispatcher (and with it the whole model) was copied")

    case = build_tiny("flux")
    model = case.model.requires_grad_(False)
    apply_addon(model, PruningAddon.from_plan(model, make_plan(model)), "b")  # blocks 1-4 are dispatched
    monkeypatch.setattr(runtime_apply._Dispatcher, "__deepcopy__", refuse, raising=False)
    again = PruningAddon.from_plan(model, make_plan(model))
    student = again.students[student_key("depth:1-3")]
    assert type(student).__name__ == "FluxTransformerBlock" and "_ppcl_dispatch" not in student.__dict__
    for p, t in zip(student.parameters(), get_spec(model).block(model, 1).parameters(), strict=True):
        assert torch.equal(p, t) and p.data_ptr() != t.data_ptr()


def test_from_plan_rejects_a_plan_for_another_model() -> None:
    model = build_tiny("qwenimage").model
    plan = make_plan(model)
    plan.stack_sizes = (8,)
    with pytest.raises(AddonMismatchError, match="stack_sizes"):
        PruningAddon.from_plan(model, plan)
    with pytest.raises(AddonMismatchError, match="arch"):
        PruningAddon.from_plan(build_tiny("sd3").model, make_plan(model))
    with pytest.raises(ConfigError, match="initialisation"):
        PruningAddon.from_plan(model, make_plan(model), init="best")


def test_save_load_round_trip(tiny_case: TinyCase, tmp_path: Path) -> None:
    model = tiny_case.model
    addon = PruningAddon.from_plan(model, make_plan(model))
    _perturb(addon)
    addon.metrics = {"a": {"psnr": 31.5, "cosine": 0.99}, "b": {"psnr": 27.25}}
    addon.provenance["steps"] = 10
    folder = addon.save_pretrained(tmp_path / "addon")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADDON_FILE, WEIGHTS_FILE, CARD_FILE])

    manifest = json.loads((folder / ADDON_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["arch"] == get_spec(model).name
    assert [lvl["name"] for lvl in manifest["levels"]] == ["a", "b"]
    assert manifest["levels"][1]["blocks"] == {"before": 6, "after": 4}
    assert manifest["levels"][1]["params"]["after"] < manifest["levels"][1]["params"]["before"]
    entry = manifest["students"]["depth_1_3"]
    assert entry["class"] == type(get_spec(model).block(model, 1)).__name__ and entry["span"] == [1, 3]
    card = (folder / CARD_FILE).read_text()
    assert "PruningAddon.from_pretrained" in card and "| b |" in card and "psnr" in card

    loaded = PruningAddon.from_pretrained(folder, model)
    assert loaded.metrics == addon.metrics and loaded.provenance["steps"] == 10
    assert loaded.plan.to_json() == addon.plan.to_json()
    for key, value in addon.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    inputs = tiny_case.make_inputs(0)
    with torch.no_grad():
        apply_addon(model, addon, "b")
        expected = tiny_case.forward(inputs)
        remove_addon(model)
        apply_addon(model, loaded, "b")
        assert torch.equal(tiny_case.forward(inputs), expected)


def test_load_onto_a_mismatched_base(tmp_path: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    model = build_tiny("qwenimage").model
    folder = PruningAddon.from_plan(model, make_plan(model)).save_pretrained(tmp_path / "addon")
    deeper = QwenImageTransformer2DModel.from_config({**model.config, "num_layers": 8})
    with pytest.raises(AddonMismatchError, match="stack_sizes") as err:
        PruningAddon.from_pretrained(folder, deeper)
    assert "[6]" in str(err.value) and "[8]" in str(err.value)
    other_text = QwenImageTransformer2DModel.from_config({**model.config, "joint_attention_dim": 24})
    with pytest.raises(AddonMismatchError, match="joint_attention_dim"):
        PruningAddon.from_pretrained(folder, other_text)
    addon = PruningAddon.from_plan(model, make_plan(model))
    with pytest.raises(AddonMismatchError, match="joint_attention_dim"):
        addon.check_base(other_text)


def test_broken_artefacts_raise_artefact_errors(tmp_path: Path) -> None:
    model = build_tiny("qwenimage").model
    folder = PruningAddon.from_plan(model, make_plan(model)).save_pretrained(tmp_path / "addon")
    weights = (folder / WEIGHTS_FILE).read_bytes()
    manifest = json.loads((folder / ADDON_FILE).read_text())

    (folder / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ArtefactError, match="truncated or corrupt"):
        PruningAddon.from_pretrained(folder, model)

    from safetensors.torch import load_file, save_file

    (folder / WEIGHTS_FILE).write_bytes(weights)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    dropped = min(tensors)
    del tensors[dropped]
    tensors["depth_9_9.extra"] = torch.zeros(1)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(folder, model)
    assert dropped in str(err.value) and "depth_9_9.extra" in str(err.value)

    (folder / ADDON_FILE).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtefactError, match="upgrade ppcl"):
        PruningAddon.from_pretrained(folder, model)
    with pytest.raises(ArtefactError, match="not found"):
        PruningAddon.from_pretrained(tmp_path / "nothing", model)


def test_students_follow_the_base_dtype(tmp_path: Path) -> None:
    model = build_tiny("flux").model
    folder = PruningAddon.from_plan(model, make_plan(model)).save_pretrained(tmp_path / "addon")
    loaded = PruningAddon.from_pretrained(folder, model.to(torch.bfloat16))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_fingerprint_sees_through_a_lora() -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = build_tiny("qwenimage").model
    plan = make_plan(model)
    before = fingerprint_of(model, plan)
    assert "transformer_blocks.1.attn.to_q.weight" in before["block_shapes"]
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k"]))
    assert fingerprint_of(model, plan) == before
    addon = PruningAddon.from_plan(model, plan)  # students are plain blocks, without the LoRA
    assert not any("lora" in name or "base_layer" in name for name, _ in addon.named_parameters())
