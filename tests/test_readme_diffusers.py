"""The README's diffusers-native snippet ("## With diffusers") runs as printed on a tiny FLUX.1 pipeline folder: a
stock ``DiffusionPipeline``, a ppcl add-on level, a base LoRA, a FirstBlockCache, and a level switch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## With diffusers", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under '## With diffusers'"
    return match.group(1)


def test_diffusers_snippet_runs(tmp_path: Path) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import ppcl
    from ppcl.addon import PruningAddon
    from tiny_models import two_span_plan
    from tiny_pipelines import build_flux

    folder = build_flux(tmp_path / "flux")
    base = ppcl.load_pipeline(folder).transformer
    PruningAddon.from_plan(base, two_span_plan(base)).save_pretrained(tmp_path / "addon")
    base.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))  # a LoRA of the base model
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(base))

    code = _snippet()
    small = (
        code.replace('"/models/FLUX.1-dev"', repr(str(folder)))
        .replace("torch.bfloat16", "torch.float32")
        .replace('"runs/depth/addon"', repr(str(tmp_path / "addon")))
        .replace('level="p40"', 'level="b"')
        .replace('"my-style-lora"', repr(str(tmp_path / "lora")))
        .replace("num_inference_steps=28", "num_inference_steps=2, height=16, width=16, max_sequence_length=8")
    )
    assert small.count(str(tmp_path)) == 3 and 'level="b"' in small  # the substitutions still match the README
    scope: dict = {}
    exec(compile(small, str(README), "exec"), scope)  # noqa: S102 - our own README
    pipe = scope["pipe"]
    assert ppcl.runtime.active_level(pipe.transformer) is None and pipe.transformer.is_cache_enabled
    assert any("lora_A" in name for name, _ in pipe.transformer.named_modules())
    pixels = np.asarray(scope["image"])
    assert pixels.shape == (16, 16, 3) and pixels.std() > 0
