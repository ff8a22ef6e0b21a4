"""The README's diffusers-native snippet ("## With diffusers") runs as printed on a tiny Qwen-Image pipeline folder: a
stock ControlNet pipeline, a ppcl add-on level, a base LoRA (saved with its peft metadata), a FirstBlockCache and a
level switch; then the same level merged, with the LoRA remapped from the merged folder: the same image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## With diffusers", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under '## With diffusers'"
    return match.group(1)


def _fixtures(tmp_path: Path) -> dict[str, str]:
    """Tiny stand-ins for every path the snippet names; returns README text → replacement."""
    from diffusers import QwenImageControlNetModel, QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from torch import nn

    import ppcl
    from ppcl.addon import PruningAddon
    from ppcl.runtime import merge, save_merged
    from tiny_models import two_span_plan
    from tiny_pipelines import build_qwen

    folder = build_qwen(tmp_path / "qwen")
    base = ppcl.load_pipeline(folder).transformer
    addon = PruningAddon.from_plan(base, two_span_plan(base))
    with torch.no_grad():  # students that differ from their blocks, so the modes could disagree
        g = torch.Generator().manual_seed(1)
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    addon.save_pretrained(tmp_path / "addon")
    save_merged(merge(base, addon, "b"), tmp_path / "p40")  # what `ppcl merge` writes (tests/test_cli.py)
    torch.manual_seed(2)
    controlnet = QwenImageControlNetModel.from_transformer(
        base, num_layers=2, attention_head_dim=16, num_attention_heads=2
    )
    with torch.no_grad():  # diffusers zero-initialises the residual projections
        for proj in controlnet.controlnet_blocks:
            nn.init.normal_(proj.weight, std=0.2)
    controlnet.save_pretrained(tmp_path / "controlnet")
    config = LoraConfig(r=2, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"])  # alpha ≠ r: scale 4
    base.add_adapter(config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=g)
    QwenImagePipeline.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=get_peft_model_state_dict(base),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "e.png")
    return {
        '"/models/Qwen-Image-ControlNet-Union"': repr(str(tmp_path / "controlnet")),
        '"/models/Qwen-Image"': repr(str(folder)),
        "torch.bfloat16": "torch.float32",
        '"runs/depth/addon"': repr(str(tmp_path / "addon")),
        '"runs/p40"': repr(str(tmp_path / "p40")),
        'level="p40"': 'level="b"',
        '"my-style-lora"': repr(str(tmp_path / "lora")),
        '"edges.png"': repr(str(tmp_path / "e.png")),
        "num_inference_steps=28": "num_inference_steps=2, height=32, width=32, max_sequence_length=8, "
        "generator=torch.Generator().manual_seed(0), output_type='np'",
    }


def test_diffusers_snippet_runs(tmp_path: Path) -> None:
    import ppcl

    code = _snippet()
    for old, new in _fixtures(tmp_path).items():
        assert old in code, f"the README snippet no longer says {old}"
        code = code.replace(old, new)
    # The add-on run's image, kept before the merged run overwrites `image`.
    code = code.replace(
        "ppcl.set_level(pipe.transformer, None)", "addon_image = image\nppcl.set_level(pipe.transformer, None)"
    )
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    pipe, merged = scope["pipe"], scope["merged"]
    assert ppcl.runtime.active_level(pipe.transformer) is None and pipe.transformer.is_cache_enabled
    assert any("lora_A" in name for name, _ in pipe.transformer.named_modules())
    assert any("lora_A" in name for name, _ in merged.transformer.named_modules())
    assert len(merged.transformer.transformer_blocks) == 4
    addon_image, merged_image = scope["addon_image"], scope["image"]
    assert addon_image.shape == (32, 32, 3) and addon_image.std() > 0
    np.testing.assert_allclose(merged_image, addon_image, rtol=0, atol=1e-4)
