"""Quantised teachers (issue 16): add-ons build from, distil from, apply to and load onto a base whose blocks hold
torchao int8 / fp8 weight-only, bitsandbytes 8-bit / 4-bit (NF4) or GGUF (Q8_0 / Q4_0) weights, on CPU; students stay
full precision; depth and width levels run.

Before: a student was a quantised copy of its teacher block (torchao), so ``save_pretrained`` failed ("invalid python
storage") and training would have updated quantised values; 4-bit weights are stored packed, so an add-on made on the
full-precision base did not fit a 4-bit one (other ``block_shapes``). diffusers' bitsandbytes loader needs a GPU, so the
bitsandbytes bases here are built the way it builds them: each block ``nn.Linear`` swapped for the bitsandbytes layer.
GGUF bases are real: the tiny model written to a ``.gguf`` file with the ``gguf`` package and read back by diffusers'
``from_single_file`` with ``GGUFQuantizationConfig``. Before GGUF support an add-on made on the full-precision base was
refused by the GGUF one (packed shapes), and ``from_plan`` on it failed (``KeyError: None``, copying a GGUF weight).
Width levels crashed on bitsandbytes and GGUF bases (a raw weight read in the modulation rows).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.data.calibration import assemble
from ppcl.distill import CalibrationData, DistillConfig, distill_depth
from ppcl.errors import ConfigError
from ppcl.runtime import apply_addon, merge, remove_addon, set_level
from ppcl.storage import has_quantized_weights, is_quantized_tensor
from test_addon_width import _perturb, width_plan
from tiny_models import build_tiny, two_span_plan

KINDS = ("torchao-int8", "torchao-fp8", "bnb-int8", "bnb-nf4", "gguf-q8_0", "gguf-q4_0")


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """``model`` with every linear layer of its blocks quantised (in place), as a quantised teacher is loaded; GGUF
    kinds return a new model read from a GGUF file of ``model``."""
    if kind.startswith("gguf"):
        return gguf_model(model, kind.removeprefix("gguf-").upper())
    blocks = get_spec(model).blocks(model)
    if kind.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "torchao-int8" else Float8WeightOnlyConfig()
        for block in blocks:
            quantize_(block, config)
        return model
    import bitsandbytes as bnb

    for block in blocks:
        for name, linear in [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]:
            if kind == "bnb-int8":
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                            has_fp16_weights=False)  # fmt: skip
                layer.weight = bnb.nn.Int8Params(
                    linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
                )
            else:
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
                # blocksize 32: the tiny blocks are 32 wide, and bitsandbytes' CPU path needs one block per row.
                layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 blocksize=32)  # fmt: skip
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, layer.to("cpu").eval())
    return model


def write_gguf(model: nn.Module, path: Path, quant_type: str) -> Path:
    """``model``'s state dict as a GGUF file at ``path``: 2-D weights whose rows are whole 32-value blocks quantised as
    ``quant_type`` (``"Q8_0"``, ``"Q4_0"``), the rest float32, as GGUF converters do; diffusers' tensor names."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant_type)
    writer = gguf.GGUFWriter(str(path), arch="tiny")
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, qtype)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_model(model: nn.Module, quant_type: str) -> nn.Module:
    """``model`` written to a GGUF file (:func:`write_gguf`) and loaded back with diffusers' ``from_single_file``."""
    from diffusers import GGUFQuantizationConfig

    with tempfile.TemporaryDirectory() as folder:
        model.save_config(folder)
        path = write_gguf(model, Path(folder) / "model.gguf", quant_type)
        config = GGUFQuantizationConfig(compute_dtype=torch.float32)
        loaded = type(model).from_single_file(
            str(path), config=folder, quantization_config=config, torch_dtype=torch.float32
        )
    return loaded.eval()


def _quantized_case(kind: str, name: str = "flux"):
    case = build_tiny(name)
    full = copy.deepcopy(case.model)
    case.model = quantize(case.model, kind)
    case.model.requires_grad_(False)
    assert has_quantized_weights(case.model)
    return case, full


@pytest.mark.parametrize("kind", KINDS)
def test_students_of_a_quantized_teacher_are_full_precision_and_round_trip(kind: str, tmp_path: Path) -> None:
    case, full = _quantized_case(kind)
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    for student in addon.students.values():
        assert not has_quantized_weights(student)
        assert all(p.dtype == torch.float32 and type(p.data) is torch.Tensor for p in student.parameters())
        assert not any(
            type(m).__module__.startswith(("bitsandbytes", "diffusers.quantizers")) for m in student.modules()
        )
    # A student starts as the teacher block it stands in for, dequantised: close to the full-precision weights.
    start = addon.students["depth_1_3"].attn.to_q.weight
    assert torch.allclose(start, full.transformer_blocks[1].attn.to_q.weight, atol=0.2)
    folder = addon.save_pretrained(tmp_path / "addon")
    loaded = PruningAddon.from_pretrained(folder, case.model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in addon.state_dict().items())
    # Made on the full-precision base, the same add-on fits the quantised one (logical shapes in the fingerprint).
    PruningAddon.from_plan(full, two_span_plan(full)).save_pretrained(tmp_path / "from-full")
    PruningAddon.from_pretrained(tmp_path / "from-full", case.model)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_levels_apply_to_a_quantized_base(kind: str) -> None:
    case, full = _quantized_case(kind)
    inputs = case.make_inputs(0)
    base_out = case.forward(inputs)
    addon = PruningAddon.from_plan(full, two_span_plan(full))
    apply_addon(case.model, addon, "b")
    pruned = case.forward(inputs)
    apply_addon(full, addon, "b")
    # The kept blocks run quantised, the students in full precision: close to the full-precision model's level.
    assert torch.allclose(pruned, full(**inputs, return_dict=False)[0], atol=0.3)
    assert not torch.allclose(pruned, base_out, atol=1e-4)
    set_level(case.model, None)
    assert torch.equal(case.forward(inputs), base_out)
    base_q = [p for n, p in case.model.named_parameters() if n.endswith("to_q.weight") and not n.startswith("ppcl.")]
    assert base_q and all(is_quantized_tensor(p) for p in base_q)  # the base stays quantised under the add-on


@pytest.mark.parametrize("kind", ["torchao-int8", "bnb-nf4", "gguf-q4_0"])
def test_distilling_from_a_quantized_teacher_trains_full_precision_students(kind: str, tmp_path: Path) -> None:
    case, _ = _quantized_case(kind)
    inputs = case.make_inputs(7)
    with torch.no_grad():
        teacher_out = case.forward(inputs)
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    calibration = assemble(get_spec(case.model), case.model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    before = {k: v.clone() for k, v in addon.students.state_dict().items()}
    distill_depth(case.model, addon, CalibrationData(calibration, 2), DistillConfig(steps=3, batch_size=2, lr=1e-3),
                  tmp_path / "run", level="b")  # fmt: skip
    after = addon.students.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    with (
        torch.no_grad()
    ):  # the teacher is frozen (bitsandbytes repacks its stored bytes for CPU kernels: compare outputs)
        assert torch.equal(case.forward(inputs), teacher_out)


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
@pytest.mark.parametrize("kind", KINDS)
def test_width_levels_apply_to_a_quantized_base(kind: str, name: str) -> None:
    """A depth + width add-on made on the full-precision base runs on the quantised one at every level (the
    modulation layers of FFN-mapped blocks are quantised too), close to the full-precision model at the same level:
    no further from it than the quantised base is from the full one, with a margin."""
    case, full = _quantized_case(kind, name)
    inputs = case.make_inputs(0)
    addon = PruningAddon.from_plan(full, width_plan(full))
    _perturb(addon)
    base_error = (case.forward(inputs) - full(**inputs, return_dict=False)[0]).abs().max()
    apply_addon(case.model, addon)
    apply_addon(full, addon)
    for level in ("w", "dw"):
        set_level(case.model, level)
        set_level(full, level)
        out = case.forward(inputs)
        error = (out - full(**inputs, return_dict=False)[0]).abs().max()
        assert torch.isfinite(out).all() and error <= 2 * base_error + 1e-3, (level, float(error), float(base_error))
    own = PruningAddon.from_plan(case.model, width_plan(case.model))  # made on the quantised base: applies too
    remove_addon(case.model)
    apply_addon(case.model, own, "dw")
    assert torch.isfinite(case.forward(inputs)).all()


def test_a_gguf_weight_two_layers_share_stays_shared_in_the_student() -> None:
    """Tied weights survive the dequantising copy: a GGUF weight held by two layers of a block is one float
    parameter held by both layers of its student (as for a full-precision block)."""
    case, _ = _quantized_case("gguf-q8_0")
    attn = case.model.transformer_blocks[1].attn
    attn.to_k.weight = attn.to_q.weight
    student = PruningAddon.from_plan(case.model, two_span_plan(case.model)).students["depth_1_3"]
    assert type(student.attn.to_q) is nn.Linear and student.attn.to_k.weight is student.attn.to_q.weight


def test_merging_a_quantized_base_is_refused() -> None:
    case, _ = _quantized_case("torchao-int8")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    with pytest.raises(ConfigError, match="quantised"):
        merge(case.model, addon, "b")


def test_the_cli_distils_and_plans_from_a_torchao_teacher_and_merge_refuses_it(tmp_path: Path) -> None:
    """``--quantize int8`` loads the teacher with diffusers' TorchAoConfig (CPU); bitsandbytes asks for a GPU."""
    from ppcl.cli.main import main

    case = build_tiny("flux")
    case.model.save_pretrained(tmp_path / "flux")
    two_span_plan(case.model).save(tmp_path / "plan")
    calibration = assemble(get_spec(case.model), case.model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    calibration.save(tmp_path / "cal")
    common = ["--model", str(tmp_path / "flux"), "--quantize", "int8", "--dtype", "bf16"]
    assert main(["distill", *common, "--plan", str(tmp_path / "plan"), "--calibration", str(tmp_path / "cal"),
                 "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    addon = PruningAddon.from_pretrained(tmp_path / "run" / "addon", case.model)
    assert all(not has_quantized_weights(s) for s in addon.students.values())
    assert main(["merge", *common, "--addon", str(tmp_path / "run" / "addon"), "--level", "b",
                 "--out", str(tmp_path / "merged")]) == 2  # fmt: skip
    assert not (tmp_path / "merged").exists()
    assert main(["merge", "--model", str(tmp_path / "flux"), "--quantize", "nf4", "--addon",
                 str(tmp_path / "run" / "addon"), "--level", "b", "--out", str(tmp_path / "m2")]) == 2  # fmt: skip


def test_the_cli_distils_from_a_gguf_transformer_and_refuses_what_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--gguf FILE`` reads the base transformer's weights from a GGUF file (config from ``--model``): distillation
    trains full-precision students that load onto the GGUF base; merge refuses it; a GGUF without a real model, with
    ``--quantize``, a file that is not GGUF and the GGUF of another model are refused with exit 2."""
    from ppcl.cli.main import main

    case = build_tiny("flux")
    case.model.save_pretrained(tmp_path / "flux")
    gguf = write_gguf(case.model, tmp_path / "flux-Q8_0.gguf", "Q8_0")
    two_span_plan(case.model).save(tmp_path / "plan")
    calibration = assemble(get_spec(case.model), case.model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    calibration.save(tmp_path / "cal")
    model = ["--model", str(tmp_path / "flux")]
    distill = ["distill", "--plan", str(tmp_path / "plan"), "--calibration", str(tmp_path / "cal"), "--steps", "2",
               "--batch-size", "2"]  # fmt: skip
    assert main([*distill, *model, "--gguf", str(gguf), "--out", str(tmp_path / "run")]) == 0
    base = gguf_model(case.model, "Q8_0").requires_grad_(False)
    addon = PruningAddon.from_pretrained(tmp_path / "run" / "addon", base)
    assert all(not has_quantized_weights(s) for s in addon.students.values())
    assert main(["merge", *model, "--gguf", str(gguf), "--addon", str(tmp_path / "run" / "addon"), "--level", "b",
                 "--out", str(tmp_path / "merged")]) == 2  # fmt: skip
    assert not (tmp_path / "merged").exists()
    (tmp_path / "notes.gguf").write_text("not a GGUF file")
    build_tiny("sd3").model.save_pretrained(tmp_path / "sd3")
    build_tiny("hunyuanvideo15").model.save_pretrained(tmp_path / "hunyuan")  # no single-file loader in diffusers
    refused = {
        "toy": [*distill, "--gguf", str(gguf)],
        "both": [*distill, *model, "--gguf", str(gguf), "--quantize", "int8"],
        "missing": [*distill, *model, "--gguf", str(tmp_path / "none.gguf")],
        "not gguf": [*distill, *model, "--gguf", str(tmp_path / "notes.gguf")],
        "other model": [*distill, "--model", str(tmp_path / "sd3"), "--gguf", str(gguf)],
        "no single-file loader": [*distill, "--model", str(tmp_path / "hunyuan"), "--gguf", str(gguf)],
    }
    for what, argv in refused.items():
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / what)]) == 2, what
        assert not (tmp_path / what).exists(), what
    # Said before the file is read, with what to use instead (not "pass this model's GGUF file": none would load).
    assert "cannot load a HunyuanVideo15Transformer3DModel from a single" in capsys.readouterr().err
