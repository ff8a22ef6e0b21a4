"""The analysis driver end to end on tiny real diffusers models: planted redundancy, every arch, the report."""

from __future__ import annotations

import math

import pytest
import torch

from ppcl.analysis import AnalysisConfig, RedundancyReport, analyze
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet, assemble
from ppcl.errors import ArtefactError
from ppcl.plan import plan_from_report
from tiny_models import build_tiny

STREAMS = ("image", "text")


def _qwen(num_layers: int, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def _qwen_calibration(model, n_calls: int = 6, batch: int = 4, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n_calls):
        mask = torch.ones(batch, 7, dtype=torch.long)
        mask[::2, 5:] = 0
        calls.append(
            {
                "hidden_states": torch.randn(batch, 16, 16, generator=g),
                "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
                "encoder_hidden_states_mask": mask,
                "timestep": torch.rand(batch, generator=g),
                "img_shapes": [[(1, 4, 4)]] * batch,
            }
        )
    return assemble(get_spec(model), model, calls, {"source": "test"})


def _calibration_for(case, n_calls: int = 4) -> CalibrationSet:
    calls = [case.make_inputs(seed) for seed in range(n_calls)]
    return assemble(get_spec(case.model), case.model, calls, {"source": "test"})


def _scale_modulation(model, blocks: range, scale: float) -> None:
    """Scale the modulation of ``blocks``: small ``scale`` → tiny gates (block ≈ identity + a small nonlinearity);
    large ``scale`` → every block does real, nonlinear work."""
    with torch.no_grad():
        for i in blocks:
            for mod in (model.transformer_blocks[i].img_mod, model.transformer_blocks[i].txt_mod):
                mod[1].weight.mul_(scale)
                mod[1].bias.mul_(scale)


@torch.no_grad()
def test_planted_linear_run_is_found_exactly():
    model = _qwen(12)
    _scale_modulation(model, range(3, 8), 0.01)
    report = analyze(model, _qwen_calibration(model), AnalysisConfig(batch_size=8))
    long = [i for i in report.intervals if i.removed >= 3]
    assert len(long) == 1, [str(i) for i in report.intervals]
    run = long[0]
    # Block u stays real (the student starts from it); the linearised blocks u+1..v are exactly the planted run.
    assert (run.u, run.v) == (2, 7)
    assert run.cka > 0.999
    # The planted blocks are fitted far better by their probes (in absolute terms) than the normal ones.
    mse = report.probe_mse["image"]
    assert max(mse[3:8]) < 1e-3 * min(mse[[0, 1, 2, 8, 9, 10, 11]])
    assert max(report.block_influence["image"][3:8]) < 1e-3 * min(report.block_influence["image"][[2, 8, 9]])


@torch.no_grad()
def test_unstructured_model_yields_no_long_intervals():
    # At diffusers' default init the tiny blocks barely change their input (every Δ ≈ 2e-4, so boundaries fall on
    # noise); larger modulation makes every block do comparable nonlinear work: no block is redundant.
    model = _qwen(12, seed=1)
    _scale_modulation(model, range(12), 8.0)
    report = analyze(model, _qwen_calibration(model), AnalysisConfig(batch_size=8))
    assert report.intervals, "the scan tiles the allowed range"
    assert max(i.removed for i in report.intervals) <= 2, [str(i) for i in report.intervals]
    assert min(i.score for i in report.intervals) > 1e-3


@pytest.mark.parametrize("name", ["qwenimage", "qwenimage_edit", "flux", "sd3", "sd35"])
@torch.no_grad()
def test_analysis_runs_on_every_arch(name, tmp_path):
    case = build_tiny(name)
    spec = get_spec(case.model)
    report = analyze(case.model, _calibration_for(case), AnalysisConfig(batch_size=4, protect_first=1, protect_last=1))
    n = spec.num_blocks(case.model)
    assert report.num_blocks == n and report.cka["image"].shape == (n, n)
    assert torch.all(torch.diagonal(report.cka["image"]) == 1)
    sizes = spec.stack_sizes(case.model)
    bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    for interval in report.intervals:
        assert 1 <= interval.u < interval.v <= n - 2  # protected ends respected
        stack = max(j for j in range(len(sizes)) if bounds[j] <= interval.u)
        assert interval.v < bounds[stack + 1], "an interval never crosses a stack boundary"
    for stream in STREAMS:
        assert report.probe_rel_error[stream].shape == (n,)
    if name.startswith("sd3"):  # the last block returns no text
        assert math.isnan(report.probe_rel_error["text"][-1])
        assert math.isnan(report.ffn_rel_error["text"][-1])
    else:
        assert not math.isnan(report.probe_rel_error["text"][-1])
    if name == "flux":  # single blocks have no separate FFN
        assert all(math.isnan(x) for x in report.ffn_rel_error["image"][3:])
        assert not any(math.isnan(x) for x in report.ffn_rel_error["image"][:3])
    report.save(tmp_path / "report")
    loaded = RedundancyReport.load(tmp_path / "report")
    assert loaded.intervals == report.intervals
    torch.testing.assert_close(loaded.cka_used, report.cka_used, rtol=0, atol=0, equal_nan=True)
    assert (tmp_path / "report" / "plots" / "cka_heatmap.png").stat().st_size > 5_000
    plan = plan_from_report(report, case.model.config, targets=[1], target_kind="blocks")
    assert plan.level_names == ["b1"]
    assert len(plan.removed_blocks("b1")) >= 1


@torch.no_grad()
def test_analysis_is_deterministic():
    model = _qwen(8)
    calib = _qwen_calibration(model, n_calls=3)
    a = analyze(model, calib, AnalysisConfig(batch_size=4, cache_tokens=64))
    b = analyze(model, calib, AnalysisConfig(batch_size=4, cache_tokens=64))
    torch.testing.assert_close(a.cka_used, b.cka_used, rtol=0, atol=0, equal_nan=True)
    assert a.intervals == b.intervals


@torch.no_grad()
def test_report_refuses_another_model():
    model, other = _qwen(8), _qwen(6)
    calib = _qwen_calibration(model, n_calls=2)
    with pytest.raises(ArtefactError, match="another model"):
        analyze(other, calib)
    report = analyze(model, calib, AnalysisConfig(batch_size=4))
    with pytest.raises(ArtefactError, match="another model config"):
        plan_from_report(report, other.config)
