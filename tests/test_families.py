"""Families added through their ``ppcl/arch`` file alone (issue 15: FLUX.2, Wan 2.x, HunyuanVideo-1.5; Qwen-Image-Edit
needs no new file, its ``zero_cond_t`` model runs every generic and width test as ``qwenimage_edit``), checked beyond the
generic ``tiny_case`` tests
(recorder re-call, passthrough, levels and level None, merge ≡ apply, stock ``from_pretrained`` of a depth merge,
which every family in ``tiny_models.ALL_ARCH_NAMES`` runs): planted redundancy found by the analysis, a few
distillation steps, and the published config's parameter count on the meta device for a stated plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, analyze
from ppcl.arch import get_spec
from ppcl.data.calibration import assemble
from ppcl.distill import CalibrationData, DistillConfig, distill_depth
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span, plan_from_report
from tiny_models import FLUX2_TINY, build_tiny, two_span_plan

# Wan2.1-T2V-14B (and each Wan2.2-A14B expert): diffusers' scripts/convert_wan_to_diffusers.py, the official configs.
WAN_14B = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}  # fmt: skip
# HunyuanVideo-1.5 480p / 720p text-to-video: diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py.
HUNYUAN15_480P = {
    "in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54,
    "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1, "qk_norm": "rms_norm",
    "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152, "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56), "target_size": 640, "task_type": "t2v",
}  # fmt: skip


# FLUX.2-dev: the class defaults (diffusers' scripts/convert_flux2_to_diffusers.py); klein-4B from the same script.
FLUX2_DEV: dict = {}
FLUX2_KLEIN_4B = {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
                  "guidance_embeds": False}  # fmt: skip


def _calibration(case, calls: int = 4):
    return assemble(get_spec(case.model), case.model, [case.make_inputs(s) for s in range(calls)], {"source": "t"})


@torch.no_grad()
def test_hunyuan15_planted_near_identity_run_is_found() -> None:
    """Blocks 2..3 of the tiny HunyuanVideo-1.5 made almost the identity (their AdaLayerNormZero modulation scaled by
    1e-3, so every gate is ~0): the analysis proposes exactly the span [1, 3], and text probes exist (both streams are
    returned, image first)."""
    case = build_tiny("hunyuanvideo15")
    for i in (2, 3):
        block = case.model.transformer_blocks[i]
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.mul_(1e-3)
            linear.bias.mul_(1e-3)
    report = analyze(case.model, _calibration(case), AnalysisConfig(batch_size=4, protect_first=1, protect_last=1))
    long = [i for i in report.intervals if i.removed >= 2]
    assert [(i.u, i.v) for i in long] == [(1, 3)], [str(i) for i in report.intervals]
    assert long[0].cka > 0.99
    assert not any(math.isnan(x) for x in report.probe_rel_error["text"])


@torch.no_grad()
def test_flux2_planted_run_in_the_joint_single_stack_is_found() -> None:
    """A tiny FLUX.2 with 3 double and 4 single blocks, single blocks 1..2 (flat 4, 5) made almost the identity (their
    output projection scaled by 1e-3, so the gated residual is ~0): the analysis proposes exactly [3, 5] inside the
    single stack. The joint ``[text; image]`` sequence is split at the prompt length, so the text stream has probes at
    every block and the token rows of the single blocks line up with the double blocks' (the span's CKA compares
    flat block 3's input, a double block's output, with single-block outputs)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**{**FLUX2_TINY, "num_single_layers": 4}).eval()
    for block in model.single_transformer_blocks[1:3]:
        block.attn.to_out.weight.mul_(1e-3)
    case = build_tiny("flux2")
    calibration = assemble(get_spec(model), model, [case.make_inputs(s) for s in range(4)], {"source": "t"})
    report = analyze(model, calibration, AnalysisConfig(batch_size=4, protect_first=1, protect_last=1))
    long = [i for i in report.intervals if i.removed >= 2]
    assert [(i.u, i.v) for i in long] == [(3, 5)], [str(i) for i in report.intervals]
    assert long[0].cka > 0.99
    assert not any(math.isnan(x) for x in report.probe_rel_error["text"])


@torch.no_grad()
def test_wan_planted_near_identity_run_is_found() -> None:
    """Blocks 2..3 of the tiny Wan made almost the identity (their residual outputs scaled by 1e-3): the analysis
    proposes exactly the span [1, 3] (block 1 stays real and its student absorbs the run) and nothing else as long."""
    case = build_tiny("wan")
    for i in (2, 3):
        block = case.model.blocks[i]
        for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
            linear.weight.mul_(1e-3)
            linear.bias.mul_(1e-3)
    report = analyze(case.model, _calibration(case), AnalysisConfig(batch_size=4, protect_first=1, protect_last=1))
    long = [i for i in report.intervals if i.removed >= 2]
    assert [(i.u, i.v) for i in long] == [(1, 3)], [str(i) for i in report.intervals]
    assert long[0].cka > 0.99
    # The text context is only read: no text outputs, so no text probes, no text runs.
    assert all(math.isnan(x) for x in report.probe_rel_error["text"])
    plan = plan_from_report(report, case.model.config, targets=[2], target_kind="blocks")
    assert plan.removed_blocks(plan.level_names[0]) == [2, 3]


@pytest.mark.parametrize("name", ["flux2", "wan", "hunyuanvideo15", "qwenimage_edit"])
def test_depth_distillation_trains_the_students(tmp_path: Path, name: str) -> None:
    case = build_tiny(name)
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    before = {k: v.clone() for k, v in addon.students.state_dict().items()}
    base = {k: v.clone() for k, v in case.model.state_dict().items()}
    config = DistillConfig(steps=4, batch_size=2, lr=1e-3, log_every=1)
    distill_depth(case.model, addon, CalibrationData(_calibration(case), 2), config, tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (tmp_path / "addon" / "ppcl_addon.json").is_file()
    after = addon.students.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(base[k], v) for k, v in case.model.state_dict().items())  # the teacher is frozen


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan", "flux2"])
def test_chained_inputs_reach_students_of_bare_output_stacks(name: str) -> None:
    """Two adjacent spans in one bare-output stack (Wan's blocks; FLUX.2's single blocks): the second student gets the
    first student's output as a chained image input (the text context is not chained: Wan's blocks only read it,
    FLUX.2's is inside the joint sequence). Before, a missing text output ended every such chain silently."""
    from ppcl.data import ActivationRecorder
    from ppcl.distill.chain import chain_groups, chained_inputs
    from ppcl.kinds import student_key

    case = build_tiny(name)
    model, spec = case.model, get_spec(case.model)
    first, second = (1, 3), (3, 5)
    if name == "flux2":  # both spans in the single stack of a 2 + 5 model
        from diffusers import Flux2Transformer2DModel

        torch.manual_seed(0)
        model = Flux2Transformer2DModel(**{**dict(model.config), "num_layers": 2, "num_single_layers": 5}).eval()
        first, second = (2, 4), (4, 6)
    reps = [DepthReplacement(Span(*first)), DepthReplacement(Span(*second))]
    sizes = tuple(spec.stack_sizes(model))
    level = Level("b", (reps[0].id, reps[1].id))
    plan = PruningPlan(spec.name, type(model).__name__, sizes, reps, [level], protect_first=1, protect_last=1)
    addon = PruningAddon.from_plan(model, plan.validate())
    with ActivationRecorder(model, [first[0], second[0]]) as rec:
        model(**case.make_inputs(0), return_dict=False)
    records = {i: rec[i][0] for i in (first[0], second[0])}

    def student_of(rep: DepthReplacement) -> torch.nn.Module:
        return addon.students[student_key(rep.id)]

    out = chained_inputs(model, spec, chain_groups(plan, reps), records, student_of, spec.blocks(model).__getitem__)
    (chained,) = out[reps[1].id]
    assert set(chained) == {"image"}
    expected = student_of(reps[0])(*records[first[0]].args, **records[first[0]].kwargs)
    assert torch.equal(chained["image"], expected)


@pytest.mark.parametrize(("spans", "removed"), [([(10, 14), (20, 25), (28, 32)], 10)])
def test_wan_14b_parameter_count_on_the_meta_device(spans: list[tuple[int, int]], removed: int) -> None:
    """ppcl's count for the real 14B config against diffusers' own modules built on the meta device, before and
    after removing ``removed`` blocks (three spans, one student each)."""
    from diffusers import WanTransformer3DModel

    reps = [DepthReplacement(Span(a, b)) for a, b in spans]
    plan = PruningPlan("wan", "WanTransformer3DModel", (40,), reps, [Level("p25", tuple(r.id for r in reps))])
    count = plan.validate().param_count(WAN_14B, "p25")
    with init_empty_weights():
        full = WanTransformer3DModel(**WAN_14B)
        small = WanTransformer3DModel(**{**WAN_14B, "num_layers": 40 - removed})
    assert count.total == sum(p.numel() for p in full.parameters()) == 14_288_491_584
    assert count.after == sum(p.numel() for p in small.parameters())


WAN_CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}


@torch.no_grad()
def _wan_latents(pipe, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, output_type="latent", generator=generator, **WAN_CALL).frames


def test_wan_pipeline_end_to_end(tmp_path: Path) -> None:
    """A tiny WanPipeline folder: calibrate through the pipeline, analyse, distil, then the add-on level and the
    merged transformer give the same video latents, and the merged pipeline is a stock diffusers folder."""
    from diffusers import DiffusionPipeline

    import ppcl
    from ppcl.cli.main import main
    from tiny_pipelines import build_wan

    folder = build_wan(tmp_path / "wan")
    pipe = ppcl.load_pipeline(folder)
    calibration = ppcl.calibrate(
        pipe, ["a red circle", "a blue square"], seeds=(0,), num_inference_steps=3, n_timesteps=2, **WAN_CALL
    )
    assert len(calibration) == 8 and calibration.batched["hidden_states"].shape[1:] == (4, 2, 2, 2)
    report = ppcl.analyze(pipe.transformer, calibration, protect_first=1, protect_last=1, batch_size=4)
    assert report.num_blocks == 6
    addon = PruningAddon.from_plan(pipe.transformer, two_span_plan(pipe.transformer))
    distill_depth(
        pipe.transformer, addon, CalibrationData(calibration, 2), DistillConfig(steps=2, batch_size=2), tmp_path / "d"
    )
    assert main(["-q", "merge", "--model", str(folder), "--addon", str(tmp_path / "d" / "addon"), "--level", "b",
                 "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    with_addon = _wan_latents(ppcl.load_pipeline(folder, tmp_path / "d" / "addon", level="b"))
    merged_pipe = ppcl.load_pipeline(folder, tmp_path / "merged")
    assert len(merged_pipe.transformer.blocks) == 4
    merged = _wan_latents(merged_pipe)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, _wan_latents(pipe))
    torch.testing.assert_close(merged, with_addon, rtol=0, atol=1e-5)
    merged_pipe.save_pretrained(tmp_path / "stock")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "stock", local_files_only=True)  # no ppcl involved
    assert torch.equal(_wan_latents(stock), merged)


@pytest.mark.parametrize(
    ("config", "total", "spans"),
    [
        (FLUX2_DEV, 32_223_281_152, [(2, 4), (20, 26), (30, 36), (40, 46)]),
        (FLUX2_KLEIN_4B, 3_875_544_576, [(8, 12), (14, 18)]),
    ],
)
def test_flux2_parameter_count_on_the_meta_device(config: dict, total: int, spans: list[tuple[int, int]]) -> None:
    """FLUX.2-dev (32B) and klein-4B against diffusers' modules on the meta device, before and after spans in both
    stacks (one student each; every block of a stack has the same size, modulation is model-level)."""
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        full = Flux2Transformer2DModel(**config)
    sizes = (full.config.num_layers, full.config.num_single_layers)
    reps = [DepthReplacement(Span(a, b)) for a, b in spans]
    plan = PruningPlan("flux2", "Flux2Transformer2DModel", sizes, reps, [Level("l", tuple(r.id for r in reps))])
    count = plan.validate().param_count(dict(full.config), "l")
    removed_double = sum(b - a - 1 for a, b in spans if b <= sizes[0])
    removed_single = sum(b - a - 1 for a, b in spans if a >= sizes[0])
    with init_empty_weights():
        small = Flux2Transformer2DModel(
            **{**config, "num_layers": sizes[0] - removed_double, "num_single_layers": sizes[1] - removed_single}
        )
    assert count.total == sum(p.numel() for p in full.parameters()) == total
    assert count.after == sum(p.numel() for p in small.parameters())


KLEIN_CALL = {"height": 32, "width": 32, "max_sequence_length": 16}


@torch.no_grad()
def _klein_latents(pipe, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt="a red circle", num_inference_steps=2, output_type="latent", generator=generator,
        **KLEIN_CALL,
    ).images  # fmt: skip


def test_flux2_klein_pipeline_end_to_end(tmp_path: Path) -> None:
    """A tiny Flux2KleinPipeline folder (true CFG: a conditional and an unconditional call per step): calibrate through
    the pipeline, analyse, distil a span in each stack, then the add-on level and the merged transformer give the same
    latents, and the merged pipeline is a stock diffusers folder."""
    from diffusers import DiffusionPipeline

    import ppcl
    from ppcl.cli.main import main
    from tiny_pipelines import build_flux2_klein

    folder = build_flux2_klein(tmp_path / "klein")
    pipe = ppcl.load_pipeline(folder)
    calibration = ppcl.calibrate(
        pipe, ["a red circle", "a blue square"], seeds=(0,), num_inference_steps=3, n_timesteps=2,
        **KLEIN_CALL,
    )  # fmt: skip
    assert len(calibration) == 8 and calibration.batched["img_ids"].shape == (8, 64, 4)
    report = ppcl.analyze(pipe.transformer, calibration, protect_first=1, protect_last=1, batch_size=4)
    assert report.num_blocks == 6 and not any(math.isnan(x) for x in report.probe_rel_error["text"])
    addon = PruningAddon.from_plan(pipe.transformer, two_span_plan(pipe.transformer))
    distill_depth(
        pipe.transformer, addon, CalibrationData(calibration, 2), DistillConfig(steps=2, batch_size=2), tmp_path / "d"
    )
    assert main(["-q", "merge", "--model", str(folder), "--addon", str(tmp_path / "d" / "addon"), "--level", "b",
                 "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    with_addon = _klein_latents(ppcl.load_pipeline(folder, tmp_path / "d" / "addon", level="b"))
    merged_pipe = ppcl.load_pipeline(folder, tmp_path / "merged")
    assert (
        len(merged_pipe.transformer.transformer_blocks),
        len(merged_pipe.transformer.single_transformer_blocks),
    ) == (
        2,
        2,
    )
    merged = _klein_latents(merged_pipe)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, _klein_latents(pipe))
    torch.testing.assert_close(merged, with_addon, rtol=0, atol=1e-5)
    merged_pipe.save_pretrained(tmp_path / "stock")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "stock", local_files_only=True)  # no ppcl involved
    assert torch.equal(_klein_latents(stock), merged)


@torch.no_grad()
def _edit_latents(pipe, per_prompt: dict, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        **per_prompt, height=32, width=32, num_inference_steps=2, output_type="latent", generator=generator
    ).images


def test_qwen_image_edit_plus_pipeline_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny QwenImageEditPlusPipeline (Edit-2511: ``zero_cond_t``) calibrated from prompt embeddings and a condition
    image: every captured call holds the target's and the condition image's tokens (two ``img_shapes`` entries), the
    analysis and distillation replay them (``temb`` of batch 2B, ``modulate_index``), and the add-on level and the
    merged transformer give the same edited latents."""
    import numpy as np
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
    from PIL import Image

    import ppcl
    from tiny_pipelines import build_qwen_edit_plus, qwen_prompt_embeds

    # The pipeline resizes condition images to about 1024² pixels for the VAE; 32² keeps the tiny test tiny.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
    folder = build_qwen_edit_plus(tmp_path / "edit")
    pipe = ppcl.load_pipeline(folder)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    per_prompt = [{**e, "image": Image.fromarray(pixels)} for e in qwen_prompt_embeds(2)]
    calibration = ppcl.calibrate(
        pipe, prompt_embeds=per_prompt, seeds=(0,), num_inference_steps=3, n_timesteps=2, height=32, width=32
    )
    assert len(calibration) == 8 and calibration.batched["hidden_states"].shape[1] == 16 + 16
    assert all(shapes == [[1, 4, 4], [1, 4, 4]] for shapes in calibration.lists["img_shapes"])
    report = ppcl.analyze(pipe.transformer, calibration, protect_first=1, protect_last=1, batch_size=4)
    assert report.num_blocks == 6
    addon = PruningAddon.from_plan(pipe.transformer, two_span_plan(pipe.transformer))
    distill_depth(
        pipe.transformer, addon, CalibrationData(calibration, 2), DistillConfig(steps=2, batch_size=2), tmp_path / "d"
    )
    base = _edit_latents(pipe, per_prompt[0])
    with_addon = _edit_latents(ppcl.load_pipeline(folder, tmp_path / "d" / "addon", level="b"), per_prompt[0])
    merged_model = ppcl.merge(pipe.transformer, addon, "b")
    assert merged_model.config.zero_cond_t and merged_model.config.num_layers == 4
    pipe.transformer = merged_model
    merged = _edit_latents(pipe, per_prompt[0])
    assert torch.isfinite(merged).all() and not torch.allclose(merged, base)
    torch.testing.assert_close(merged, with_addon, rtol=0, atol=1e-5)


HUNYUAN_CALL = {"height": 16, "width": 16, "num_frames": 5}


@torch.no_grad()
def _hunyuan_latents(pipe, per_prompt: dict, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(**per_prompt, num_inference_steps=2, output_type="latent", generator=generator, **HUNYUAN_CALL).frames


def test_hunyuan15_pipeline_end_to_end(tmp_path: Path) -> None:
    """A tiny HunyuanVideo15Pipeline, which has no step callback: calibration follows its scheduler's steps (the
    captured timesteps are the scheduler's at the kept steps, a conditional and an unconditional call each), then
    analysis, distillation, and the add-on level ≡ the merged transformer on the pipeline's video latents."""
    import ppcl
    from tiny_pipelines import build_hunyuan15, hunyuan15_prompt_embeds

    folder = build_hunyuan15(tmp_path / "hy")
    pipe = ppcl.load_pipeline(folder)
    per_prompt = hunyuan15_prompt_embeds(2)
    calibration = ppcl.calibrate(
        pipe, prompt_embeds=per_prompt, seeds=(0,), num_inference_steps=4, n_timesteps=2, **HUNYUAN_CALL
    )
    kept = calibration.meta["kept_steps"]
    assert kept == [0, 3] and len(calibration) == 2 * 2 * 2  # prompts x kept steps x (cond, uncond)
    schedule = pipe.scheduler.timesteps  # as the last sampling run set it (every run sets the same)
    expected = sorted(float(schedule[k]) for k in kept for _ in range(4))
    assert expected[0] != expected[-1]
    assert sorted(calibration.batched["timestep"].tolist()) == pytest.approx(expected)
    report = ppcl.analyze(pipe.transformer, calibration, protect_first=1, protect_last=1, batch_size=4)
    assert report.num_blocks == 6
    addon = PruningAddon.from_plan(pipe.transformer, two_span_plan(pipe.transformer))
    distill_depth(
        pipe.transformer, addon, CalibrationData(calibration, 2), DistillConfig(steps=2, batch_size=2), tmp_path / "d"
    )
    base = _hunyuan_latents(pipe, per_prompt[0])
    with_addon = _hunyuan_latents(ppcl.load_pipeline(folder, tmp_path / "d" / "addon", level="b"), per_prompt[0])
    pipe.transformer = ppcl.merge(pipe.transformer, addon, "b")
    merged = _hunyuan_latents(pipe, per_prompt[0])
    assert torch.isfinite(merged).all() and not torch.allclose(merged, base)
    torch.testing.assert_close(merged, with_addon, rtol=0, atol=1e-5)


def test_hunyuan15_parameter_count_on_the_meta_device() -> None:
    """The published 480p config (8.3B) against diffusers' modules on the meta device, before and after three spans
    that remove 3 + 5 + 3 = 11 blocks."""
    from diffusers import HunyuanVideo15Transformer3DModel

    reps = [DepthReplacement(Span(a, b)) for a, b in [(12, 16), (24, 30), (36, 40)]]
    plan = PruningPlan(
        "hunyuanvideo15", "HunyuanVideo15Transformer3DModel", (54,), reps, [Level("p20", tuple(r.id for r in reps))]
    )
    count = plan.validate().param_count(HUNYUAN15_480P, "p20")
    with init_empty_weights():
        full = HunyuanVideo15Transformer3DModel(**HUNYUAN15_480P)
        small = HunyuanVideo15Transformer3DModel(**{**HUNYUAN15_480P, "num_layers": 54 - 11})
    assert count.total == sum(p.numel() for p in full.parameters()) == 8_326_608_160
    assert count.after == sum(p.numel() for p in small.parameters())


def test_qwen_image_edit_2511_parameter_count_on_the_meta_device() -> None:
    """Qwen-Image-Edit-2511 is the Qwen-Image 20B config with ``zero_cond_t=True`` (condition-image tokens modulated at
    t = 0; no new parameters): the public plan's count is the same class's, checked against diffusers' modules."""
    from diffusers import QwenImageTransformer2DModel

    config = {"zero_cond_t": True}  # every other entry: the class defaults, the real 20B model
    reps = [DepthReplacement(Span(a, b)) for a, b in [(3, 5), (5, 8), (8, 12)]]
    plan = PruningPlan("qwenimage", "QwenImageTransformer2DModel", (60,), reps, [Level("e", tuple(r.id for r in reps))])
    with init_empty_weights():
        full = QwenImageTransformer2DModel(**config)
        small = QwenImageTransformer2DModel(**config, num_layers=60 - 6)
    count = plan.validate().param_count(dict(full.config), "e")
    assert count.total == sum(p.numel() for p in full.parameters()) == 20_430_401_088
    assert count.after == sum(p.numel() for p in small.parameters())


def test_calibrate_cli_num_frames_for_video_pipelines(tmp_path: Path) -> None:
    """``ppcl calibrate --num-frames`` reaches a video pipeline (Wan: 5 frames → 2 latent frames) and is refused,
    before any loading, for an image pipeline."""
    from ppcl.cli.main import main
    from ppcl.data.calibration import CalibrationSet
    from tiny_pipelines import build_flux, build_wan

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    wan = build_wan(tmp_path / "wan")
    argv = ["-q", "calibrate", "--prompts", str(prompts), "--steps", "2", "--timesteps", "1", "--height", "16",
            "--width", "16", "--num-frames", "5"]  # fmt: skip
    assert main([*argv, "--pipeline", str(wan), "--out", str(tmp_path / "cal")]) == 0
    assert CalibrationSet.load(tmp_path / "cal").batched["hidden_states"].shape[2] == 2
    flux = build_flux(tmp_path / "flux")
    assert main([*argv, "--pipeline", str(flux), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()
