"""ArchSpec on tiny real diffusers transformers: block access, call binding, passthrough, depth-pruning rewrite."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from ppcl.arch import (
    FLUX2_SPEC,
    FLUX_SPEC,
    HUNYUAN15_SPEC,
    QWENIMAGE_SPEC,
    SD3_SPEC,
    WAN_SPEC,
    ArchSpec,
    WidthTargets,
    get_spec,
    spec_by_name,
)
from ppcl.data import ActivationRecorder
from ppcl.errors import ConfigError, PPCLError, UnsupportedModelError
from tiny_models import TinyCase, build_tiny

# Blocks removed in the rewrite test: both Flux stacks lose one block, SD3 keeps its protected last block.
KEPT = {
    "qwenimage": [0, 1, 4, 5],
    "qwenimage_edit": [0, 2, 3, 5],
    "flux": [0, 2, 3, 5],
    "sd3": [0, 1, 4, 5],
    "sd35": [0, 2, 3, 5],
    "flux2": [0, 2, 3, 5],
    "wan": [0, 2, 3, 5],
    "hunyuanvideo15": [0, 1, 4, 5],
}
# Stacks whose blocks return only the image stream, as a bare tensor (Wan: the text context is read, never returned;
# FLUX.2's single blocks: the joint [text; image] sequence the model passes as hidden_states); models whose blocks
# return the image stream first (HunyuanVideo-1.5); models that call their blocks positionally on every path.
IMAGE_ONLY_STACKS = {"wan": {"blocks"}, "flux2": {"single_transformer_blocks"}}
IMAGE_FIRST = {"hunyuanvideo15"}
POSITIONAL = {"wan", "hunyuanvideo15"}


def image_only(case: TinyCase, i: int) -> bool:
    """Whether flat block ``i`` of ``case`` returns its image stream alone, as a bare tensor."""
    return get_spec(case.model).locate(case.model, i)[0] in IMAGE_ONLY_STACKS.get(case.name, set())


def joins_streams(case: TinyCase, i: int) -> bool:
    """Whether the model concatenates ``[text; image]`` between blocks ``i`` and ``i + 1`` (FLUX.2's stack switch)."""
    return case.name == "flux2" and i == len(case.model.transformer_blocks) - 1


@contextmanager
def skipped(model: nn.Module, spec: ArchSpec, indices: Sequence[int]) -> Iterator[None]:
    """Make blocks ``indices`` pass their inputs through (as the runtime does for removed blocks)."""
    blocks = spec.blocks(model)

    def make(i: int) -> Any:
        return lambda *args, **kwargs: spec.passthrough(model, i, args, kwargs)

    for i in indices:
        blocks[i].forward = make(i)
    try:
        yield
    finally:
        for i in indices:
            del blocks[i].forward


# -------------------------------------------------------------------------------------------------- registry
def test_get_spec_by_instance_class_and_name(tiny_case: TinyCase) -> None:
    expected = {
        "qwenimage": QWENIMAGE_SPEC,
        "qwenimage_edit": QWENIMAGE_SPEC,
        "flux": FLUX_SPEC,
        "sd3": SD3_SPEC,
        "sd35": SD3_SPEC,
        "flux2": FLUX2_SPEC,
        "wan": WAN_SPEC,
        "hunyuanvideo15": HUNYUAN15_SPEC,
    }[tiny_case.name]
    assert get_spec(tiny_case.model) is expected
    assert get_spec(type(tiny_case.model)) is expected
    assert spec_by_name(expected.name) is expected
    expected.validate(tiny_case.model)


def test_unsupported_model_raises() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        get_spec(nn.Linear(2, 2))
    assert isinstance(info.value, PPCLError)
    assert info.value.expected and "FluxTransformer2DModel" in info.value.expected
    assert info.value.found and "Linear" in info.value.found
    assert info.value.fix
    with pytest.raises(UnsupportedModelError):
        spec_by_name("dit")


def test_subclass_of_supported_class_is_supported() -> None:
    from diffusers import SD3Transformer2DModel

    class MySD3(SD3Transformer2DModel):
        pass

    assert get_spec(MySD3) is SD3_SPEC


def test_input_names_match_block_signatures(tiny_case: TinyCase) -> None:
    spec = get_spec(tiny_case.model)
    for stack, blocks in zip(spec.stacks, spec.stack_lists(tiny_case.model), strict=True):
        params = tuple(inspect.signature(blocks[0].forward).parameters)
        assert params == stack.input_names
        for stream in spec.streams:
            assert stack.input_name(stream) in params
        for _, name in stack.roles:
            assert name in params


def test_validate_detects_signature_drift(tiny_case: TinyCase) -> None:
    spec = get_spec(tiny_case.model)
    drifted = replace(spec, stacks=(replace(spec.stacks[0], input_names=("hidden_states", "temb")), *spec.stacks[1:]))
    with pytest.raises(UnsupportedModelError, match="signature"):
        drifted.validate(tiny_case.model)


# ---------------------------------------------------------------------------------------------- block access
def test_flat_block_axis() -> None:
    case = build_tiny("flux")
    model, spec = case.model, FLUX_SPEC
    assert spec.num_blocks(model) == 6
    assert spec.stack_sizes(model) == [3, 3]
    assert spec.blocks(model) == [*model.transformer_blocks, *model.single_transformer_blocks]
    assert spec.locate(model, 2) == ("transformer_blocks", 2)
    assert spec.locate(model, 3) == ("single_transformer_blocks", 0)
    assert spec.locate(model, -1) == ("single_transformer_blocks", 2)
    assert spec.block_name(model, 4) == "single_transformer_blocks.1"
    assert spec.block(model, 4) is model.single_transformer_blocks[1]
    assert spec.stack_of(model, 4).dual_stream is False
    assert spec.stack_of(model, 0).dual_stream is True
    with pytest.raises(ConfigError):
        spec.locate(model, 6)


def test_sd3_output_order_and_last_block(tiny_case: TinyCase) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    for i in range(spec.num_blocks(model)):
        if image_only(tiny_case, i):
            assert spec.output_order(model, i) == ("image",) and not spec.returns_text(model, i)
            continue
        order = ("image", "text") if tiny_case.name in IMAGE_FIRST else ("text", "image")
        assert spec.output_order(model, i) == order
        is_sd3_last = spec is SD3_SPEC and i == spec.num_blocks(model) - 1
        assert spec.returns_text(model, i) is not is_sd3_last


def test_positional_and_keyword_calls_bind_alike(tiny_case: TinyCase) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    with ActivationRecorder(model, [0, -1]) as rec, torch.no_grad():
        tiny_case.forward(tiny_case.make_inputs(0))
    for i in (0, spec.num_blocks(model) - 1):
        call = rec[i][0]
        names = spec.stack_of(model, i).input_names
        if tiny_case.name in POSITIONAL:  # Wan and HunyuanVideo-1.5 call their blocks positionally on every path
            assert call.kwargs == {} and 0 < len(call.args) <= len(names)
            call = type(call)(args=(), kwargs=dict(zip(names, call.args, strict=False)), output=call.output)
        else:
            assert call.args == () and call.kwargs  # the normal path calls blocks with keywords
        positional = tuple(call.kwargs.get(n) for n in names)
        by_kw = spec.split_inputs(model, i, (), call.kwargs)
        by_pos = spec.split_inputs(model, i, positional, {})
        mixed = spec.split_inputs(model, i, positional[:2], {n: call.kwargs[n] for n in names[2:] if n in call.kwargs})
        for split in (by_pos, mixed):
            assert split.keys() == by_kw.keys() == {"image", "text"}
            for stream in split:
                assert split[stream] is by_kw[stream]
        image_out = spec.split_outputs(model, i, call.output)["image"]
        with torch.no_grad():
            assert torch.equal(spec.split_outputs(model, i, spec.block(model, i)(*positional))["image"], image_out)
        with pytest.raises(ConfigError):
            spec.bind_call(model, i, positional[:1], {names[0]: positional[0]})
        with pytest.raises(ConfigError):
            spec.bind_call(model, i, (*positional, None), {})
        with pytest.raises(ConfigError):
            spec.split_outputs(model, i, [image_out] if image_only(tiny_case, i) else image_out)


# ------------------------------------------------------------------------------------------------ passthrough
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_passthrough_hands_inputs_to_next_block(tiny_case: TinyCase, position: str) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    n = spec.num_blocks(model)
    # Flux "middle" = the last double block, so the hand-over crosses into the single-stream stack.
    i = {"first": 0, "middle": 2, "last": n - 1}[position]
    arrived: list[torch.Tensor] = []
    hook = model.norm_out.register_forward_pre_hook(lambda _m, args: arrived.append(args[0]))
    try:
        with skipped(model, spec, [i]), ActivationRecorder(model, [j for j in (i, i + 1) if j < n]) as rec:
            with torch.no_grad():
                out = tiny_case.forward(tiny_case.make_inputs(1))
    finally:
        hook.remove()
    assert torch.isfinite(out).all()
    call = rec[i][0]
    given = spec.split_inputs(model, i, call.args, call.kwargs)
    returned = spec.split_outputs(model, i, call.output)
    assert torch.equal(returned["image"], given["image"])
    if spec.returns_text(model, i):
        assert torch.equal(returned["text"], given["text"])
    elif image_only(tiny_case, i):
        assert torch.equal(call.output, given["image"])  # a bare tensor, like the real block's
    else:
        assert call.output[0] is None  # SD3's last block returns (None, hidden_states), skipped or not
    if i + 1 < n and joins_streams(tiny_case, i):
        nxt = rec[i + 1][0]
        received = spec.split_inputs(model, i + 1, nxt.args, nxt.kwargs)
        assert torch.equal(received["image"], torch.cat([given["text"], given["image"]], dim=1))
        assert received["text"] is None
    elif i + 1 < n:
        nxt = rec[i + 1][0]
        received = spec.split_inputs(model, i + 1, nxt.args, nxt.kwargs)
        assert torch.equal(received["image"], given["image"])
        assert received["text"] is given["text"] or torch.equal(received["text"], given["text"])
    elif image_only(tiny_case, i) and tiny_case.name == "flux2":  # the model keeps the image rows of the joint output
        text_length = tiny_case.make_inputs(1)["encoder_hidden_states"].shape[1]
        assert torch.equal(arrived[0], given["image"][:, text_length:])
    else:
        assert torch.equal(arrived[0], given["image"])


def test_passthrough_matches_sd3_native_skip_layers() -> None:
    case = build_tiny("sd3")
    inputs = case.make_inputs(2)
    with torch.no_grad():
        native = case.model(**inputs, skip_layers=[2, 3], return_dict=False)[0]
        with skipped(case.model, SD3_SPEC, [2, 3]):
            ours = case.forward(inputs)
    assert torch.equal(native, ours)


# ---------------------------------------------------------------------------------------------- depth rewrite
def test_rewrite_config_load_and_match_skipped_teacher(tiny_case: TinyCase) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    kept = KEPT[tiny_case.name]
    new_config = spec.rewrite_config(model.config, kept)
    spec.check_pruned_compatible(model, kept)
    pruned = type(model).from_config(new_config).eval()
    pruned.load_state_dict(spec.kept_state_dict(model, kept), strict=True)
    assert spec.num_blocks(pruned) == len(kept)
    removed = [i for i in range(spec.num_blocks(model)) if i not in kept]
    inputs = tiny_case.make_inputs(3)
    with torch.no_grad():
        expected = tiny_case.forward(inputs)
        with skipped(model, spec, removed):
            skipped_out = tiny_case.forward(inputs)
        got = pruned(**inputs, return_dict=False)[0]
    assert not torch.allclose(expected, skipped_out)  # the removed blocks did matter
    torch.testing.assert_close(got, skipped_out, rtol=1e-6, atol=1e-6)


def test_flux_rewrite_counts_both_stacks() -> None:
    case = build_tiny("flux")
    new = FLUX_SPEC.rewrite_config(case.model.config, [0, 2, 3, 5])
    assert (new["num_layers"], new["num_single_layers"]) == (2, 2)
    new = FLUX_SPEC.rewrite_config(case.model.config, [3, 4])
    assert (new["num_layers"], new["num_single_layers"]) == (0, 2)
    singles_only = type(case.model).from_config(new)  # an emptied stack still builds, loads and runs
    singles_only.load_state_dict(FLUX_SPEC.kept_state_dict(case.model, [3, 4]), strict=True)
    with torch.no_grad():
        assert torch.isfinite(singles_only(**case.make_inputs(0), return_dict=False)[0]).all()
    sd = FLUX_SPEC.kept_state_dict(case.model, [0, 2, 3, 5])
    original = case.model.state_dict()
    assert torch.equal(sd["transformer_blocks.1.ff.net.2.weight"], original["transformer_blocks.2.ff.net.2.weight"])
    assert torch.equal(
        sd["single_transformer_blocks.1.proj_out.weight"], original["single_transformer_blocks.2.proj_out.weight"]
    )
    assert not any(k.startswith(("transformer_blocks.2.", "single_transformer_blocks.2.")) for k in sd)
    assert torch.equal(sd["proj_out.weight"], original["proj_out.weight"])


def test_sd35_dual_attention_layers_reindexed() -> None:
    case = build_tiny("sd35")
    new = SD3_SPEC.rewrite_config(case.model.config, [0, 2, 3, 5])
    assert new["num_layers"] == 4
    assert tuple(new["dual_attention_layers"]) == (0, 1)  # old 0 -> 0, old 2 -> 1; old 1 was removed
    pruned = type(case.model).from_config(new)
    assert [b.use_dual_attention for b in pruned.transformer_blocks] == [True, True, False, False]
    assert [b.context_pre_only for b in pruned.transformer_blocks] == [False, False, False, True]
    assert SD3_SPEC.rewrite_config(case.model.config, [3, 4, 5])["dual_attention_layers"] == ()


def test_sd3_last_block_is_protected() -> None:
    case = build_tiny("sd3")
    with pytest.raises(ConfigError, match="last block"):
        SD3_SPEC.rewrite_config(case.model.config, [0, 1, 2, 3, 4])
    with pytest.raises(ConfigError, match="last block"):
        SD3_SPEC.kept_state_dict(case.model, [0, 1, 2, 3, 4])


def test_incompatible_kept_blocks_are_reported() -> None:
    case = build_tiny("sd35")
    # Pretend dual attention is not recorded in the config: block 0 (dual) would land on a plain position.
    case.model.register_to_config(dual_attention_layers=())
    with pytest.raises(ConfigError, match="Kept block 0"):
        SD3_SPEC.check_pruned_compatible(case.model, [0, 5])


@pytest.mark.parametrize("kept", [[], [0, 0, 5], [0, 6], [-1, 5]])
def test_invalid_kept_lists(kept: list[int]) -> None:
    case = build_tiny("qwenimage")
    with pytest.raises(ConfigError):
        QWENIMAGE_SPEC.rewrite_config(case.model.config, kept)


# ---------------------------------------------------------------------------------------------- width targets
def test_width_targets_exist_on_blocks(tiny_case: TinyCase) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    modules = dict(model.named_modules())
    for i in range(spec.num_blocks(model)):
        declared = spec.stack_of(model, i).width
        resolved = spec.width_targets(model, i)
        assert set(declared.names()) - set(resolved.names()) <= declared.optional
        assert set(resolved.text_kv) <= set(resolved.text)
        for name in resolved.names():
            assert isinstance(modules.get(f"{spec.block_name(model, i)}.{name}"), nn.Module), name
    if tiny_case.name in ("qwenimage", "flux", "sd35"):  # every declared name exists on some block of these configs
        for stack in spec.stacks:
            present = set()
            for i in range(spec.num_blocks(model)):
                if spec.stack_of(model, i) is stack:
                    present |= set(spec.width_targets(model, i).names())
            assert present == set(stack.width.names())


def test_width_target_specifics() -> None:
    flux = build_tiny("flux").model
    assert FLUX_SPEC.width_targets(flux, 0).ffn_of("text") == "ff_context"
    assert FLUX_SPEC.width_targets(flux, 3).ffn == ()  # single blocks: MLP fused into proj_out
    assert FLUX_SPEC.width_targets(flux, 3).text == ()
    sd3 = build_tiny("sd3").model
    last = SD3_SPEC.width_targets(sd3, 5)
    assert last.ffn_of("text") is None and "attn.to_add_out" not in last.text
    assert "attn.norm_added_q" not in SD3_SPEC.width_targets(sd3, 0).text  # qk_norm=None in SD3


def test_missing_required_width_target_raises() -> None:
    case = build_tiny("qwenimage")
    bad = replace(QWENIMAGE_SPEC, stacks=(replace(QWENIMAGE_SPEC.stacks[0], width=WidthTargets(text=("txt_nope",))),))
    with pytest.raises(UnsupportedModelError, match="txt_nope"):
        bad.width_targets(case.model, 0)
