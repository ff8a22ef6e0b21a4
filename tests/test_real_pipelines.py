"""End to end through saved tiny real pipelines (FLUX.1, SD3, Qwen-Image), offline.

Per pipeline folder: calibrate → analyze → plan → distill (2 steps) → merge → generate, with the same verbs and flags
as docs/real-models.md. A depth-only merged transformer swapped into the pipeline folder is saved and loaded back with
stock ``DiffusionPipeline.from_pretrained``. Qwen-Image also runs embeddings-only (no text encoder in the folder):
calibration through prompt embeddings, generation through the Python API.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ppcl
from ppcl.cli.main import main
from tiny_pipelines import build_flux, build_qwen, build_sd3, qwen_prompt_embeds

STEPS = ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "0"]


def _chain(tmp: Path, folder: Path, cal: Path) -> dict[str, Path]:
    """analyze → plan → distill --pipeline → merge on a calibration set captured from ``folder``."""
    paths = {n: tmp / n for n in ("rep", "plan", "depth", "merged")}
    assert (
        main(
            [
                "-q",
                "analyze",
                "--model",
                str(folder),
                "--calibration",
                str(cal),
                "--out",
                str(paths["rep"]),
                "--targets",
                "1",
                "--target-kind",
                "blocks",
                "--protect-first",
                "1",
                "--protect-last",
                "1",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "plan",
                "--model",
                str(folder),
                "--report",
                str(paths["rep"]),
                "--out",
                str(paths["plan"]),
                "--targets",
                "1",
                "--target-kind",
                "blocks",
                "--level-names",
                "d1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "distill",
                "--pipeline",
                str(folder),
                "--calibration",
                str(cal),
                "--plan",
                str(paths["plan"]),
                "--out",
                str(paths["depth"]),
                *STEPS,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "merge",
                "--model",
                str(folder),
                "--addon",
                str(paths["depth"] / "addon"),
                "--level",
                "d1",
                "--out",
                str(paths["merged"]),
            ]
        )
        == 0
    )
    return paths


def _n_blocks(transformer: torch.nn.Module) -> int:
    return sum(len(getattr(transformer, a, [])) for a in ("transformer_blocks", "single_transformer_blocks"))


@pytest.mark.parametrize(
    ("build", "size"), [(build_flux, 16), (build_sd3, 16), (build_qwen, 32)], ids=["flux", "sd3", "qwen"]
)
def test_cli_chain_and_stock_reload(build, size: int, tmp_path: Path) -> None:
    folder = build(tmp_path / "pipe")
    SIZE = ["--height", str(size), "--width", str(size)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left of a cat\n")
    cal = tmp_path / "cal"
    assert (
        main(
            [
                "-q",
                "calibrate",
                "--pipeline",
                str(folder),
                "--prompts",
                str(prompts),
                "--seeds",
                "0",
                "--steps",
                "4",
                "--timesteps",
                "2",
                *SIZE,
                "--out",
                str(cal),
            ]
        )
        == 0
    )
    paths = _chain(tmp_path, folder, cal)
    for extra in (["--addon", str(paths["depth"] / "addon"), "--level", "d1"], ["--addon", str(paths["merged"])]):
        out = tmp_path / f"img{len(extra)}.png"
        assert (
            main(
                [
                    "-q",
                    "generate",
                    "--pipeline",
                    str(folder),
                    *extra,
                    "--prompt",
                    "a red circle",
                    "--steps",
                    "2",
                    *SIZE,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert out.is_file()
    # Depth-only merge: a stock pipeline folder with the smaller transformer loads without ppcl.
    from diffusers import DiffusionPipeline

    pipe = ppcl.load_pipeline(folder, paths["merged"])
    pipe.save_pretrained(str(tmp_path / "stock"))
    stock = DiffusionPipeline.from_pretrained(str(tmp_path / "stock"), local_files_only=True)
    base_blocks = _n_blocks(ppcl.load_pipeline(folder).transformer)
    assert _n_blocks(stock.transformer) == _n_blocks(pipe.transformer) < base_blocks
    image = stock(prompt="a red circle", num_inference_steps=2, height=size, width=size, output_type="np").images
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()
    # distill --pipeline without cached inputs is refused before anything loads.
    assert (
        main(
            [
                "-q",
                "distill",
                "--pipeline",
                str(folder),
                "--plan",
                str(paths["plan"]),
                "--out",
                str(tmp_path / "x"),
                *STEPS,
            ]
        )
        == 2
    )


def test_qwen_chain_through_prompt_embeddings(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from ppcl.data.pipeline_capture import calibrate_pipeline

    folder = build_qwen(tmp_path / "pipe", text_encoder=False)
    pipe = ppcl.load_pipeline(folder)
    embeds = qwen_prompt_embeds()
    calib = calibrate_pipeline(
        pipe,
        prompt_embeds=embeds,
        seeds=(0, 1),
        num_inference_steps=4,
        n_timesteps=2,
        height=32,
        width=32,
        true_cfg_scale=2.0,
    )
    calib.save(tmp_path / "cal")
    paths = _chain(tmp_path, folder, tmp_path / "cal")
    # The CLI needs a text encoder to read --prompt; an embeddings-only folder is a clear error, as is a bad --out.
    cli = [
        "-q",
        "generate",
        "--pipeline",
        str(folder),
        "--addon",
        str(paths["merged"]),
        "--prompt",
        "a red circle",
        "--steps",
        "1",
    ]
    assert main([*cli, "--out", str(tmp_path / "img.png")]) == 2
    assert main([*cli, "--out", str(tmp_path / "img.txt")]) == 2
    assert not (tmp_path / "img.png").exists()
    call = {**embeds[0], "num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    with_addon = ppcl.load_pipeline(folder, paths["depth"] / "addon", level="d1")
    assert np.isfinite(with_addon(**call).images).all()
    merged = ppcl.load_pipeline(folder, paths["merged"])
    merged.save_pretrained(str(tmp_path / "stock"))
    stock = DiffusionPipeline.from_pretrained(
        str(tmp_path / "stock"), local_files_only=True, text_encoder=None, tokenizer=None
    )
    assert len(stock.transformer.transformer_blocks) == 5
    images = [p(**call, generator=torch.Generator().manual_seed(0)).images for p in (stock, merged)]
    torch.testing.assert_close(torch.as_tensor(images[0]), torch.as_tensor(images[1]))
