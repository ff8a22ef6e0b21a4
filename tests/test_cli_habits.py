"""CLI flags do what they say (issue 16, item 6): ``--guidance`` reaches the pipeline in ``calibrate`` and
``generate`` (Qwen-Image's true CFG needs a negative prompt: ``--negative-prompt``, default ``" "``), and a calibration
captured in bf16 trains a float32 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ppcl.cli.main import main
from ppcl.data.calibration import CalibrationSet
from tiny_pipelines import build_qwen, build_sd3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": build_sd3(root / "sd3"), "qwenimage": build_qwen(root / "qwen")}


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def _calibrate(pipe: Path, prompts: Path, out: Path, size: int, *extra: str) -> CalibrationSet:
    argv = ["-q", "calibrate", "--pipeline", str(pipe), "--prompts", str(prompts), "--steps", "2", "--timesteps", "1",
            "--height", str(size), "--width", str(size), "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return CalibrationSet.load(out)


@pytest.mark.parametrize(("name", "size"), [("sd3", 16), ("qwenimage", 32)])
def test_calibrate_guidance_reaches_the_pipeline(pipes: dict[str, Path], prompts: Path, tmp_path: Path, name: str,
                                                 size: int) -> None:  # fmt: skip
    """``--guidance 1`` runs no CFG (one conditional call per step), ``--guidance 4`` runs it (an unconditional call
    too, so twice the samples; Qwen-Image's true CFG with the default negative prompt " "); a given
    ``--negative-prompt`` changes the unconditional inputs. Before, ``--guidance`` left the content hash unchanged."""
    plain = _calibrate(pipes[name], prompts, tmp_path / "g1", size, "--guidance", "1")
    guided = _calibrate(pipes[name], prompts, tmp_path / "g4", size, "--guidance", "4")
    assert len(guided) == 2 * len(plain) and guided.content_hash != plain.content_hash
    other = _calibrate(pipes[name], prompts, tmp_path / "neg", size, "--guidance", "4", "--negative-prompt", "grass")
    assert len(other) == len(guided) and other.content_hash != guided.content_hash


def test_generate_guidance_runs_true_cfg_on_qwen_image(pipes: dict[str, Path], tmp_path: Path) -> None:
    """``ppcl generate --guidance`` on Qwen-Image changes the image (its true CFG now gets a negative prompt; the
    images were byte-identical), and ``--negative-prompt`` is used when given."""
    from PIL import Image

    def generate(name: str, *extra: str) -> np.ndarray:
        argv = ["-q", "generate", "--pipeline", str(pipes["qwenimage"]), "--prompt", "a red circle", "--steps", "2",
                "--height", "32", "--width", "32", "--out", str(tmp_path / name), *extra]  # fmt: skip
        assert main(argv) == 0
        return np.asarray(Image.open(tmp_path / name))

    g1, g4 = generate("g1.png", "--guidance", "1"), generate("g4.png", "--guidance", "4")
    negative = generate("neg.png", "--guidance", "4", "--negative-prompt", "grass")
    assert not np.array_equal(g1, g4) and not np.array_equal(g4, negative)


def test_a_bf16_calibration_trains_a_float32_model(pipes: dict[str, Path], prompts: Path, tmp_path: Path) -> None:
    """Calibrated in bf16, distilled at the default float32: the captured streams are cast to the model's dtype (this
    ended in a raw ``RuntimeError: Input type (c10::BFloat16) and bias type (float)``)."""
    cal = _calibrate(pipes["sd3"], prompts, tmp_path / "cal", 16, "--dtype", "bf16")
    assert str(cal.batched["hidden_states"].dtype) == "torch.bfloat16"
    sd3 = str(pipes["sd3"])
    assert main(["-q", "analyze", "--model", sd3, "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "rep"),
                 "--targets", "1", "--target-kind", "blocks", "--protect-first", "1", "--protect-last", "1",
                 "--batch-size", "2"]) == 0  # fmt: skip
    assert main(["-q", "plan", "--model", sd3, "--report", str(tmp_path / "rep"), "--out", str(tmp_path / "plan"),
                 "--targets", "1", "--target-kind", "blocks"]) == 0  # fmt: skip
    assert main(["-q", "distill", "--pipeline", sd3, "--calibration", str(tmp_path / "cal"), "--plan",
                 str(tmp_path / "plan"), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2"]) == 0  # fmt: skip
    assert (tmp_path / "run" / "addon").is_dir()


def test_calibrate_and_generate_with_a_quantised_transformer(
    pipes: dict[str, Path], prompts: Path, tmp_path: Path
) -> None:
    """``--quantize int8`` (torchao, CPU): calibration captures the quantised teacher (other values, same model:
    the content differs, the fingerprint not), and generate samples from it; refused for the toy world."""
    from PIL import Image

    # Two kept steps: the first step's inputs are the noise and the prompt, the second's follow the transformer.
    plain = _calibrate(pipes["sd3"], prompts, tmp_path / "plain", 16, "--timesteps", "2")
    quantised = _calibrate(pipes["sd3"], prompts, tmp_path / "int8", 16, "--timesteps", "2", "--quantize", "int8")
    assert len(quantised) == len(plain) and quantised.content_hash != plain.content_hash
    assert quantised.config_hash == plain.config_hash  # the same model to the fingerprint
    argv = ["-q", "generate", "--pipeline", str(pipes["sd3"]), "--prompt", "a red circle", "--steps", "2",
            "--height", "16", "--width", "16", "--quantize", "int8", "--out", str(tmp_path / "q.png")]  # fmt: skip
    assert main(argv) == 0 and np.asarray(Image.open(tmp_path / "q.png")).std() > 0
    assert main(["-q", "calibrate", "--out", str(tmp_path / "toy"), "--quantize", "int8"]) == 2


def test_calibrate_and_generate_with_a_gguf_transformer(pipes: dict[str, Path], prompts: Path, tmp_path: Path) -> None:
    """``--gguf FILE``: calibration captures the GGUF-quantised transformer (the same model to the fingerprint, other
    values) and generate samples from it; ``--gguf`` with a merged model or the toy world is refused."""
    from diffusers import SD3Transformer2DModel
    from PIL import Image

    from test_quantized import write_gguf

    transformer = SD3Transformer2DModel.from_pretrained(pipes["sd3"], subfolder="transformer")
    gguf = str(write_gguf(transformer, tmp_path / "sd3-Q4_0.gguf", "Q4_0"))
    plain = _calibrate(pipes["sd3"], prompts, tmp_path / "plain", 16, "--timesteps", "2")
    quantised = _calibrate(pipes["sd3"], prompts, tmp_path / "q4", 16, "--timesteps", "2", "--gguf", gguf)
    assert len(quantised) == len(plain) and quantised.content_hash != plain.content_hash
    assert quantised.config_hash == plain.config_hash
    argv = ["-q", "generate", "--pipeline", str(pipes["sd3"]), "--prompt", "a red circle", "--steps", "2",
            "--height", "16", "--width", "16", "--gguf", gguf, "--out", str(tmp_path / "q.png")]  # fmt: skip
    assert main(argv) == 0 and np.asarray(Image.open(tmp_path / "q.png")).std() > 0
    assert main(["-q", "calibrate", "--out", str(tmp_path / "toy"), "--gguf", gguf]) == 2
    assert main(["-q", "generate", "--prompt", "x", "--gguf", gguf, "--out", str(tmp_path / "toy.png")]) == 2
