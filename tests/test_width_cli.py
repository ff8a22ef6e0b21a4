"""Width levels and training stages from the CLI, and ``ppcl.load_pipeline`` (toy and a tiny real Qwen-Image pipeline).

The toy chain runs once per module with tiny sizes: calibrate → analyze --width → distill (depth) → distill --stage
width → distill --stage finetune → eval → merge of the width level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ppcl
from ppcl.cli.main import main
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, FFNLinear, Level, PruningPlan, Span, TextRun
from ppcl.runtime import active_level, save_merged
from test_calibration import _tiny_qwen_pipeline

STEPS = ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("width_cli")
    paths = {n: tmp / n for n in ("cal", "rep", "depth", "width", "ft", "merged")}
    assert main(["-q", "calibrate", "--out", str(paths["cal"]), "--num-prompts", "4", "--timesteps", "2"]) == 0
    assert (
        main(
            [
                "-q",
                "analyze",
                "--calibration",
                str(paths["cal"]),
                "--out",
                str(paths["rep"]),
                "--targets",
                "2,4",
                "--target-kind",
                "blocks",
                "--width",
                "--ffn-blocks",
                "2",
            ]
        )
        == 0
    )
    assert main(["-q", "distill", "--plan", str(paths["rep"] / "plan"), "--out", str(paths["depth"]), *STEPS]) == 0
    assert (
        main(
            [
                "-q",
                "distill",
                "--stage",
                "width",
                "--addon",
                str(paths["depth"] / "addon"),
                "--level",
                "b4+w",
                "--out",
                str(paths["width"]),
                *STEPS,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "distill",
                "--stage",
                "finetune",
                "--addon",
                str(paths["width"] / "addon"),
                "--level",
                "b4+w",
                "--out",
                str(paths["ft"]),
                *STEPS,
            ]
        )
        == 0
    )
    return paths


def test_analyze_width_adds_a_width_level_per_depth_level(chain: dict[str, Path], capsys) -> None:
    plan = PruningPlan.load(chain["rep"] / "plan")
    assert plan.level_names == ["b2", "b4", "b2+w", "b4+w"]
    wide = plan.replacements_of("b4+w")
    assert {r.id for r in plan.replacements_of("b4")} < {r.id for r in wide}
    assert any(isinstance(r, TextRun | FFNLinear) for r in wide)
    assert sum(isinstance(r, FFNLinear) for r in wide) == 2
    # `ppcl plan --width` re-budgets the same way, with a stricter threshold giving no more text runs.
    capsys.readouterr()
    out = chain["rep"].parent / "plan_strict"
    assert (
        main(
            [
                "plan",
                "--report",
                str(chain["rep"]),
                "--out",
                str(out),
                "--targets",
                "2",
                "--target-kind",
                "blocks",
                "--width",
                "--text-cka-threshold",
                "0.9999",
                "--ffn-blocks",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "parameters per level:" in printed and "b2+w" in printed
    strict = PruningPlan.load(out)
    assert len(_runs(strict, "b2+w")) <= len(_runs(plan, "b2+w"))
    assert sum(isinstance(r, FFNLinear) for r in strict.replacements_of("b2+w")) == 1


def test_stages_record_provenance_and_eval_merge_load(chain: dict[str, Path], tmp_path: Path) -> None:
    manifest = json.loads((chain["ft"] / "addon" / "ppcl_addon.json").read_text())
    assert {"depth", "width", "finetune"} <= set(manifest["provenance"])
    assert manifest["provenance"]["width"]["level"] == "b4+w"
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "--addon",
                str(chain["ft"] / "addon"),
                "--out",
                str(out),
                "--levels",
                "b4,b4+w",
                "--repeats",
                "1",
                "--batches",
                "1",
                "--batch-size",
                "4",
                "--no-shapes-eval",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert rows["b4+w"]["params"] < rows["b4"]["params"] < rows["teacher"]["params"]
    assert (
        main(["-q", "merge", "--addon", str(chain["ft"] / "addon"), "--level", "b4+w", "--out", str(chain["merged"])])
        == 0
    )
    pipe = ppcl.load_pipeline(None, chain["merged"])
    images = pipe(["a red circle", "a blue square left of a green triangle"], seeds=0, steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    # The add-on at the same level gives the same images as the merged model (same maths, other layout).
    applied = ppcl.load_pipeline("toy", chain["ft"] / "addon", level="b4+w")
    np.testing.assert_allclose(
        applied(["a red circle", "a blue square left of a green triangle"], seeds=0, steps=2), images, atol=2
    )


def test_load_pipeline_addon_equals_sampling_from_the_applied_model(chain: dict[str, Path]) -> None:
    from ppcl.toy.sampler import SamplerConfig, sample
    from ppcl.toy.teacher import ToyTeacher

    pipe = ppcl.load_pipeline(None, chain["width"] / "addon", level="b4+w")
    assert active_level(pipe.transformer) == "b4+w"
    teacher = ToyTeacher.load()
    addon = ppcl.PruningAddon.from_pretrained(chain["width"] / "addon", teacher.transformer)
    ppcl.apply_addon(teacher.transformer, addon, level="b4+w")
    want = sample(teacher, ["a green circle"], [3], SamplerConfig(steps=3, guidance=4.0), show_progress=False)
    np.testing.assert_array_equal(pipe(["a green circle"], seeds=[3], steps=3), want)


def test_wrong_combinations_are_clear_errors(chain: dict[str, Path], tmp_path: Path) -> None:
    addon = chain["depth"] / "addon"
    with pytest.raises(ConfigError, match="needs a level"):
        ppcl.load_pipeline(None, addon)
    with pytest.raises(ConfigError, match="no levels"):
        ppcl.load_pipeline(None, chain["merged"], level="b4")
    with pytest.raises(ConfigError, match="needs an add-on"):
        ppcl.load_pipeline(None, None, level="b4")
    with pytest.raises(ConfigError, match="model_index.json"):
        ppcl.load_pipeline(tmp_path, addon, level="b4")
    with pytest.raises(ppcl.PPCLError, match="neither an add-on"):
        ppcl.load_pipeline(None, tmp_path)
    run = ["-q", "distill", "--out", str(tmp_path / "x"), *STEPS]
    assert main([*run, "--stage", "width", "--addon", str(addon)]) == 2  # no --level
    assert main([*run, "--stage", "width", "--plan", str(chain["rep"] / "plan")]) == 2  # no --addon
    assert main([*run, "--stage", "width", "--addon", str(addon), "--level", "b4"]) == 2  # no width in b4
    assert main([*run, "--stage", "finetune", "--addon", str(addon), "--level", "nope"]) == 2
    assert main([*run, "--full", "--plan", str(chain["rep"] / "plan")]) == 2  # --full: finetune only
    assert main(run) == 2  # neither --plan nor --addon
    assert not (tmp_path / "x" / "addon").exists()


def test_load_pipeline_on_a_saved_tiny_qwen_pipeline(tmp_path: Path) -> None:
    pipe = _tiny_qwen_pipeline()
    folder = tmp_path / "pipe"
    # Saved without text encoder / tokenizer (model_index.json records them as [null, null]); load_pipeline
    # passes them as None, so this folder loads offline.
    pipe.save_pretrained(str(folder))
    transformer = pipe.transformer
    plan = PruningPlan(
        "qwenimage",
        "QwenImageTransformer2DModel",
        (6,),
        [DepthReplacement(Span(2, 4)), TextRun.from_inclusive(1, 4, skip=(3,)), FFNLinear(5)],
        [Level("d", ("depth:2-4",)), Level("dw", ("depth:2-4", "text:1-5", "ffn:5"))],
        protect_first=1,
        protect_last=0,
    ).validate()
    addon = ppcl.PruningAddon.from_plan(transformer, plan)
    with torch.no_grad():  # non-identity projections, so the width level really differs from the depth one
        for p in addon.parameters():
            p.add_(0.01 * torch.randn_like(p))
    addon.save_pretrained(tmp_path / "addon")
    inputs = _inputs()
    loaded = ppcl.load_pipeline(folder, tmp_path / "addon", level="dw")
    assert type(loaded).__name__ == "QwenImagePipeline" and loaded.text_encoder is None
    ppcl.apply_addon(transformer, addon, level="dw")
    with torch.no_grad():
        want = transformer(**inputs, return_dict=False)[0]
        torch.testing.assert_close(loaded.transformer(**inputs, return_dict=False)[0], want)
    save_merged(ppcl.merge(transformer, addon, "dw"), tmp_path / "merged")
    swapped = ppcl.load_pipeline(folder, tmp_path / "merged")
    assert len(swapped.transformer.transformer_blocks) == 5
    assert swapped.components["transformer"] is swapped.transformer
    with torch.no_grad():
        torch.testing.assert_close(swapped.transformer(**inputs, return_dict=False)[0], want, rtol=1e-4, atol=1e-5)


def _runs(plan: PruningPlan, level: str) -> list[TextRun]:
    return [r for r in plan.replacements_of(level) if isinstance(r, TextRun)]


def _inputs() -> dict[str, torch.Tensor | list]:
    """One batch for the tiny pipeline's transformer: a 4x4 grid of 2x2 patches, 5 text tokens."""
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4)]],
    }
