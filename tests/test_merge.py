"""merge: a level baked into a stock diffusers model; remap_lora_state_dict for merged models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, merge, remap_lora_state_dict, set_level
from tiny_models import TinyCase, build_tiny, two_span_plan

# Block counts per config key after level "b" (spans [1:3] and [3:5] removed one block each).
EXPECTED_CONFIG = {
    "qwenimage": {"num_layers": 4},
    "qwenimage_edit": {"num_layers": 4, "zero_cond_t": True},
    "flux": {"num_layers": 2, "num_single_layers": 2},  # [1:3] in the double stack, [3:5] in the single stack
    "sd3": {"num_layers": 4},
    "sd35": {"num_layers": 4, "dual_attention_layers": (0, 1)},  # (0, 1, 2) minus removed block 2
    "flux2": {"num_layers": 2, "num_single_layers": 2},
    "wan": {"num_layers": 4},
    "hunyuanvideo15": {"num_layers": 4},
}


def make_plan(model: nn.Module) -> PruningPlan:
    return two_span_plan(model)


def make_addon(model: nn.Module, plan: PruningPlan | None = None) -> PruningAddon:
    addon = PruningAddon.from_plan(model, plan or make_plan(model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return addon


@torch.no_grad()
def test_merged_model_is_a_stock_checkpoint(tiny_case: TinyCase, tmp_path: Path) -> None:
    model, inputs = tiny_case.model, tiny_case.make_inputs(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    addon = make_addon(model)
    apply_addon(model, addon, "b")
    applied = tiny_case.forward(inputs)

    merged = merge(model, addon, "b")
    assert type(merged) is type(model) and not hasattr(merged, "ppcl")
    for key, value in EXPECTED_CONFIG[tiny_case.name].items():
        assert tuple(merged.config[key]) == value if isinstance(value, tuple) else merged.config[key] == value
    assert len(get_spec(merged).blocks(merged)) == 4
    torch.testing.assert_close(merged(**inputs, return_dict=False)[0], applied, rtol=0, atol=1e-5)

    # The base model is untouched and shares no storage with the merged one.
    set_level(model, None)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    base_ptrs = {t.data_ptr() for t in model.state_dict().values()} | {p.data_ptr() for p in addon.parameters()}
    assert not base_ptrs & {t.data_ptr() for t in merged.state_dict().values()}

    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()  # plain diffusers, no ppcl involved
    assert torch.equal(reloaded(**inputs, return_dict=False)[0], merged(**inputs, return_dict=False)[0])


@torch.no_grad()
def test_student_weights_land_at_the_span_start() -> None:
    model = build_tiny("qwenimage").model
    addon = make_addon(model)
    merged = merge(model, addon, "a")  # works without applying
    kept = addon.plan.kept_blocks("a")
    assert kept == [0, 1, 3, 4, 5]
    new_blocks = get_spec(merged).blocks(merged)
    student = addon.students["depth_1_3"].state_dict()
    assert all(torch.equal(new_blocks[1].state_dict()[k], v) for k, v in student.items())
    base_block3 = get_spec(model).block(model, 3).state_dict()
    assert all(torch.equal(new_blocks[2].state_dict()[k], v) for k, v in base_block3.items())


def test_saving_the_applied_base_writes_a_pure_base_checkpoint(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    apply_addon(model, make_addon(model), "b")
    model.save_pretrained(tmp_path / "base")
    from safetensors import safe_open

    files = list((tmp_path / "base").glob("*.safetensors"))
    with safe_open(str(files[0]), framework="pt") as handle:
        assert not any(k.startswith("ppcl") for k in handle.keys())
    reloaded = type(model).from_pretrained(tmp_path / "base").eval()
    set_level(model, None)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs, return_dict=False)[0], case.forward(inputs))


def test_merge_errors() -> None:
    sd35 = build_tiny("sd35").model
    # A student copied from block 3 (no second attention) cannot sit at position 2, which keeps block 2's
    # dual attention in the rewritten config.
    plan = PruningPlan(
        "sd3",
        "SD3Transformer2DModel",
        (6,),
        [DepthReplacement(Span(2, 4), "last")],
        [Level("x", ("depth:2-4",))],
        protect_first=1,
        protect_last=1,
    )
    addon = make_addon(sd35, plan)
    with pytest.raises(ConfigError, match="does not fit its position transformer_blocks.2"):
        merge(sd35, addon, "x")
    qwen = build_tiny("qwenimage").model
    with pytest.raises(ConfigError, match="no level 'c'"):
        merge(qwen, make_addon(qwen), "c")
    with pytest.raises(ConfigError, match="level name"):
        merge(qwen, make_addon(qwen), None)  # type: ignore[arg-type]


def test_merge_refuses_a_base_with_a_lora() -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = build_tiny("qwenimage").model
    addon = make_addon(model)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q"]))
    with pytest.raises(ConfigError, match="adapter"):
        merge(model, addon, "b")


def test_remap_lora_state_dict() -> None:
    flux = build_tiny("flux").model
    plan = make_plan(flux)  # level b: double [1:3] → keeps 0, 1; single [3:5] (local 0, 1) → keeps local 0, 2
    lora = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1),
        "transformer.transformer_blocks.1.attn.to_q.lora_A.weight": torch.ones(1),
        "transformer.transformer_blocks.2.attn.to_q.lora_A.weight": torch.ones(1),
        "transformer.single_transformer_blocks.1.proj_out.lora_B.weight": torch.ones(1),
        "transformer.single_transformer_blocks.2.proj_out.lora_B.weight": torch.full((1,), 2.0),
        "transformer.proj_out.lora_A.weight": torch.ones(1),
    }
    dropped: list[str] = []
    out = remap_lora_state_dict(lora, plan, "b", dropped=dropped)
    # Span starts (double 1, single 0) hold students, which run without the base LoRA in add-on mode too.
    assert list(out) == [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.single_transformer_blocks.1.proj_out.lora_B.weight",
        "transformer.proj_out.lora_A.weight",
    ]
    assert torch.equal(out["transformer.single_transformer_blocks.1.proj_out.lora_B.weight"], torch.full((1,), 2.0))
    assert dropped == [
        "transformer.transformer_blocks.1.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.2.attn.to_q.lora_A.weight",
        "transformer.single_transformer_blocks.1.proj_out.lora_B.weight",
    ]
    kept = remap_lora_state_dict(lora, plan, "b", keep_students=True)  # the former behaviour, on request
    assert "transformer.transformer_blocks.1.attn.to_q.lora_A.weight" in kept and len(kept) == 4
    qwen_plan = make_plan(build_tiny("qwenimage").model)
    assert remap_lora_state_dict({"transformer_blocks.5.img_mlp.lora_A.weight": 1}, qwen_plan, "b") == {
        "transformer_blocks.3.img_mlp.lora_A.weight": 1
    }
    with pytest.raises(ConfigError, match="names block 9"):
        remap_lora_state_dict({"transformer_blocks.9.attn.to_q.lora_A.weight": 1}, qwen_plan, "b")


@torch.no_grad()
# peft notes that the remapped LoRA has no weights for the student position's layers: that is the policy.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_a_base_lora_gives_the_same_images_in_addon_and_merged_modes() -> None:
    """One LoRA policy (issue 16): a base LoRA loaded on the base with the add-on applied, and the same LoRA
    remapped onto the merged model, give the same output (they differed by 0.025-0.056: the merged model put the
    span-start LoRA on the student, which the add-on runs without it)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    case = build_tiny("flux")
    base, inputs = case.model, case.make_inputs(0)
    addon = make_addon(base)
    donor = copy.deepcopy(base)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "proj_out"]))
    g = torch.Generator().manual_seed(3)
    for name, p in donor.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}
    merged = merge(base, addon, "b")
    merged.load_lora_adapter(remap_lora_state_dict(lora, addon.plan, "b"), prefix="transformer")
    with_addon = copy.deepcopy(base)
    with_addon.load_lora_adapter(lora, prefix="transformer")
    apply_addon(with_addon, addon, "b")
    expected = with_addon(**inputs, return_dict=False)[0]
    torch.testing.assert_close(merged(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, case.forward(inputs))  # the LoRA matters


WIDTH_LORA_TARGETS = {
    "flux": ["to_q", "add_q_proj", "add_k_proj", "to_add_out", "norm1.linear", "norm1_context.linear",
             "ff.net.0.proj", "ff_context.net.2", "proj_mlp"],
    "qwenimage": ["to_q", "add_q_proj", "add_k_proj", "to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj",
                  "txt_mlp.net.2"],
    "sd3": ["to_q", "add_q_proj", "add_k_proj", "to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
            "ff_context.net.2"],
}  # fmt: skip
"""'All linear layers' LoRAs: on modules a width merge deletes (text query / output, text FFN, mapped FFNs), cuts
(the modulation layers) and keeps."""


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
def test_a_base_lora_gives_the_same_images_on_a_width_merge(name: str, tmp_path: Path) -> None:
    """One LoRA policy at width levels: a base LoRA on every kind of linear layer, with the add-on applied at the
    depth + width level, and the same LoRA remapped onto the width merge (from the model and from its saved folder),
    give the same output. Before, loading the remapped LoRA failed (``size mismatch`` on the cut modulation rows)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ppcl.runtime import load_merged, save_merged
    from test_addon_width import _perturb, width_plan

    case = build_tiny(name)
    base, inputs = case.model.requires_grad_(False), case.make_inputs(0)
    addon = PruningAddon.from_plan(base, width_plan(base))
    _perturb(addon)
    with_addon = copy.deepcopy(base)
    with_addon.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=WIDTH_LORA_TARGETS[name], init_lora_weights=False)
    )
    lora = get_peft_model_state_dict(with_addon)
    apply_addon(with_addon, addon, "dw")
    expected = with_addon(**inputs, return_dict=False)[0]
    merged = merge(base, addon, "dw")
    without = merged(**inputs, return_dict=False)[0]
    folder = save_merged(merged, tmp_path / "merged")
    dropped: list[str] = []
    remapped = remap_lora_state_dict(lora, merged, dropped=dropped)
    assert remap_lora_state_dict(lora, folder).keys() == remapped.keys()
    assert any(".ff." in k or "_mlp." in k or "add_q_proj" in k for k in dropped)  # deleted modules' keys go
    for target in (merged, load_merged(folder)):
        target.load_lora_adapter(remap_lora_state_dict(lora, folder), prefix=None)
        torch.testing.assert_close(target(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, without, atol=1e-3)  # the LoRA matters
    with pytest.raises(ConfigError, match="prunes width"):
        remap_lora_state_dict(lora, addon.plan, "dw")


def test_a_malformed_width_record_is_an_artefact_error(tmp_path: Path) -> None:
    import json

    from ppcl.errors import ArtefactError
    from ppcl.runtime import MERGED_FILE, save_merged
    from test_addon_width import width_plan

    case = build_tiny("flux")
    folder = save_merged(
        merge(case.model, PruningAddon.from_plan(case.model, width_plan(case.model)), "w"), tmp_path / "m"
    )
    record = json.loads((folder / MERGED_FILE).read_text())
    del record["substitutions"][0]["block_name"]
    (folder / MERGED_FILE).write_text(json.dumps(record))
    with pytest.raises(ArtefactError, match="incomplete"):
        remap_lora_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 32)}, folder)


def test_lora_tensors_a_width_merge_cannot_cut_are_refused() -> None:
    """On a cut modulation layer only lora_A / lora_B can follow the merge: a DoRA magnitude, or a lora_B whose
    lora_A is missing (its input width says how many rows each chunk has), is a ConfigError naming the key."""
    from test_addon_width import width_plan

    case = build_tiny("qwenimage")
    merged = merge(case.model, PruningAddon.from_plan(case.model, width_plan(case.model)), "w")
    cut = next(n for n, m in merged.named_modules() if n.endswith("img_mod.1") and m.out_features == 3 * m.in_features)
    d = merged.get_submodule(cut).in_features
    with pytest.raises(ConfigError, match="lora_magnitude_vector"):
        remap_lora_state_dict({f"{cut}.lora_magnitude_vector": torch.ones(6 * d)}, merged)
    with pytest.raises(ConfigError, match="no lora_A"):
        remap_lora_state_dict({f"{cut}.lora_B.weight": torch.ones(6 * d, 2)}, merged)
    rows = remap_lora_state_dict(
        {f"{cut}.lora_A.weight": torch.ones(2, d), f"{cut}.lora_B.bias": torch.arange(6 * d)}, merged
    )
    assert torch.equal(rows[f"{cut}.lora_B.bias"], torch.arange(3 * d))  # the attention-half rows 0-2 are kept
