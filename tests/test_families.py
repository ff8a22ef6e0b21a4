"""Families added through their ``ppcl/arch`` file alone (issue 15: Wan 2.x, HunyuanVideo-1.5; Qwen-Image-Edit needs no
new file, its ``zero_cond_t`` model runs every generic and width test as ``qwenimage_edit``), checked beyond the
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
from tiny_models import build_tiny, two_span_plan

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


@pytest.mark.parametrize("name", ["wan", "hunyuanvideo15", "qwenimage_edit"])
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
