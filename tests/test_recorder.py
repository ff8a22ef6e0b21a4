"""ActivationRecorder on tiny real diffusers transformers: exact re-calls, multiple passes, storage options."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ppcl.arch import get_spec
from ppcl.data import ActivationRecorder, recall
from ppcl.errors import ConfigError
from tiny_models import TinyCase, build_tiny


def assert_same(a: Any, b: Any) -> None:
    """Bit-exact structural equality of tensors / tuples / None."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a is b or a == b


def test_recall_reproduces_every_block_exactly(tiny_case: TinyCase) -> None:
    spec, model = get_spec(tiny_case.model), tiny_case.model
    n = spec.num_blocks(model)
    with ActivationRecorder(model, range(n)) as rec, torch.no_grad():
        tiny_case.forward(tiny_case.make_inputs(0))
    blocks = spec.blocks(model)
    for i in range(n):
        (call,) = rec[i]
        with torch.no_grad():
            assert_same(recall(blocks[i], call), call.output)
        outputs = spec.split_outputs(model, i, call.output)
        assert outputs["image"] is not None
        assert (outputs["text"] is None) is (not spec.returns_text(model, i))
        if i + 1 < n:  # block i's output is exactly what block i+1 receives
            received = spec.split_inputs(model, i + 1, rec[i + 1][0].args, rec[i + 1][0].kwargs)
            if tiny_case.name == "flux2" and i == len(model.transformer_blocks) - 1:  # the model joins the streams
                assert torch.equal(received["image"], torch.cat([outputs["text"], outputs["image"]], dim=1))
                continue
            assert torch.equal(received["image"], outputs["image"])
            if outputs["text"] is not None:  # Wan's blocks only read the text context: it is their own input
                assert torch.equal(received["text"], outputs["text"])


def test_captures_shared_conditioning() -> None:
    case = build_tiny("qwenimage")
    with ActivationRecorder(case.model, [1]) as rec, torch.no_grad():
        case.forward(case.make_inputs(0))
    kwargs = rec[1][0].kwargs
    assert set(kwargs) == set(get_spec(case.model).stacks[0].input_names)
    assert kwargs["encoder_hidden_states_mask"].dtype == torch.bool
    assert not kwargs["encoder_hidden_states_mask"].all()
    assert isinstance(kwargs["image_rotary_emb"], tuple) and kwargs["image_rotary_emb"][0].is_complex()
    assert kwargs["temb"].shape == (2, 32)


def test_qwen_zero_cond_t_modulate_index_is_recorded() -> None:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=True,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {  # edit-style input: target image tokens (index 0) then one reference image (index 1)
        "hidden_states": torch.randn(2, 32, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 7, 16, generator=g),
        "encoder_hidden_states_mask": torch.ones(2, 7),
        "timestep": torch.rand(2, generator=g),
        "img_shapes": [[(1, 4, 4), (1, 4, 4)]] * 2,
    }
    with ActivationRecorder(model, [3]) as rec, torch.no_grad():
        model(**inputs, return_dict=False)
    call = rec[3][0]
    assert call.kwargs["modulate_index"].shape == (2, 32)
    assert call.kwargs["temb"].shape[0] == 4  # zero_cond_t doubles the conditioning batch
    with torch.no_grad():
        assert_same(recall(get_spec(model).block(model, 3), call), call.output)


def test_multiple_passes_clear_and_only_chosen_blocks() -> None:
    case = build_tiny("flux")
    rec = ActivationRecorder(case.model, [1, 4])
    with rec, torch.no_grad():
        case.forward(case.make_inputs(0))
        case.forward(case.make_inputs(1))
    assert set(rec.records) == {1, 4}
    assert len(rec[1]) == len(rec[4]) == 2 and len(rec) == 4
    assert not torch.equal(rec[4][0].kwargs["hidden_states"], rec[4][1].kwargs["hidden_states"])
    with torch.no_grad():
        case.forward(case.make_inputs(2))  # hooks are gone after the with block
    assert len(rec) == 4
    rec.clear()
    assert len(rec) == 0 and set(rec.records) == {1, 4}
    with pytest.raises(ConfigError):
        ActivationRecorder(case.model, [6])


def test_gradient_checkpointing_path_is_positional() -> None:
    case = build_tiny("qwenimage")
    spec, model = get_spec(case.model), case.model
    inputs = case.make_inputs(0)
    with ActivationRecorder(model, [2]) as ref, torch.no_grad():
        expected = case.forward(inputs)
    model.enable_gradient_checkpointing()
    with ActivationRecorder(model, [2]) as rec, torch.enable_grad():
        got = case.forward(inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    call = rec[2][0]
    assert call.kwargs == {} and len(call.args) == len(spec.stacks[0].input_names)
    by_pos = spec.split_inputs(model, 2, call.args, call.kwargs)
    by_kw = spec.split_inputs(model, 2, ref[2][0].args, ref[2][0].kwargs)
    for stream in ("image", "text"):
        assert torch.equal(by_pos[stream], by_kw[stream])
    with torch.no_grad():
        assert_same(recall(spec.block(model, 2), call), call.output)
        assert_same(spec.passthrough(model, 2, call.args, call.kwargs), (by_kw["text"], by_kw["image"]))


def test_storage_conversion_and_dedup() -> None:
    case = build_tiny("qwenimage")
    with ActivationRecorder(case.model, [0, 1], dtype=torch.float64, clone=True) as rec, torch.no_grad():
        case.forward(case.make_inputs(0))
    first, second = rec[0][0], rec[1][0]
    assert first.kwargs["hidden_states"].dtype == torch.float64
    assert first.output[1].dtype == torch.float64
    assert first.kwargs["encoder_hidden_states_mask"].dtype == torch.bool  # masks are not cast
    assert first.kwargs["image_rotary_emb"][0].dtype == torch.complex64  # complex rotary is not cast
    # Converted once per pass: shared conditioning and the hand-over between blocks are the same stored tensor.
    assert second.kwargs["temb"] is first.kwargs["temb"]
    assert second.kwargs["hidden_states"] is first.output[1]
    assert second.kwargs["encoder_hidden_states"] is first.output[0]


def test_clone_detaches_storage() -> None:
    case = build_tiny("sd3")
    seen: list[torch.Tensor] = []
    block = get_spec(case.model).block(case.model, 3)
    hook = block.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    with ActivationRecorder(case.model, [3], clone=True) as rec, torch.no_grad():
        case.forward(case.make_inputs(0))
    hook.remove()
    stored = rec[3][0].kwargs["hidden_states"]
    assert torch.equal(stored, seen[0]) and stored.data_ptr() != seen[0].data_ptr()


def test_paused_keeps_recalls_out_of_records() -> None:
    case = build_tiny("sd35")
    block = get_spec(case.model).block(case.model, -1)
    with ActivationRecorder(case.model, [-1]) as rec, torch.no_grad():
        case.forward(case.make_inputs(0))
        with rec.paused():
            out = recall(block, rec[-1][0])
        assert len(rec) == 1
        recall(block, rec[-1][0])
        assert len(rec) == 2
    assert out[0] is None
    assert_same(out, rec[5][0].output)
