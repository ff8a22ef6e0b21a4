"""A merged model saved the diffusers way keeps what makes it loadable (issue 16): ``save_pretrained`` of a merged
transformer, or of a pipeline holding one, also writes ``ppcl_merged.json`` (width merges), ``ppcl_blocks.json`` and
the card, so ``ppcl.load_pipeline`` / ``ppcl.load_merged`` load the folder back. Before, a width-merged pipeline's
``save_pretrained`` wrote a folder neither diffusers nor ppcl could load, and a depth-merged one lost its ControlNet
mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ppcl
from ppcl.addon import PruningAddon
from ppcl.errors import PPCLError
from ppcl.runtime import BLOCKS_FILE, COMPONENT_MODULE, MERGED_FILE, load_merged, merge, save_merged
from ppcl.runtime.merge_width import RECORD_ATTR
from test_addon_width import _perturb, width_plan
from tiny_models import build_tiny, two_span_plan
from tiny_pipelines import build_qwen, build_sd3, qwen_prompt_embeds


@torch.no_grad()
def test_a_width_merged_model_saves_with_save_pretrained(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, width_plan(case.model))
    _perturb(addon)
    merged = merge(case.model, addon, "dw")
    merged.save_pretrained(tmp_path / "plain")  # the diffusers call, not ppcl's save_merged
    assert (tmp_path / "plain" / MERGED_FILE).is_file() and (tmp_path / "plain" / BLOCKS_FILE).is_file()
    inputs = case.make_inputs(0)
    expected = merged(**inputs, return_dict=False)[0]
    torch.testing.assert_close(
        load_merged(tmp_path / "plain")(**inputs, return_dict=False)[0], expected, rtol=0, atol=0
    )
    save_merged(load_merged(tmp_path / "plain"), tmp_path / "again")  # a loaded one saves the same files again
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(
        p.name for p in (tmp_path / "plain").iterdir()
    )


@torch.no_grad()
def test_a_pipeline_with_a_merged_transformer_saves_and_loads_back(tmp_path: Path) -> None:
    folder = build_qwen(tmp_path / "qwen", text_encoder=False)
    base = ppcl.load_pipeline(folder).transformer
    for name, plan, level in (("width", width_plan(base), "dw"), ("depth", two_span_plan(base), "b")):
        addon = PruningAddon.from_plan(base, plan)
        _perturb(addon)
        save_merged(merge(base, addon, level), tmp_path / f"{name}-merged")
        pipe = ppcl.load_pipeline(folder, tmp_path / f"{name}-merged")
        out = tmp_path / f"{name}-pipeline"
        pipe.save_pretrained(out)
        assert (out / "transformer" / BLOCKS_FILE).is_file()
        assert (out / "transformer" / MERGED_FILE).is_file() == (name == "width")
        again = ppcl.load_pipeline(out)
        assert again.transformer.ppcl_block_map == pipe.transformer.ppcl_block_map
        embeds = qwen_prompt_embeds(1, seed=0)[0]
        images = [
            p(
                **embeds,
                num_inference_steps=2,
                height=32,
                width=32,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
            for p in (pipe, again)
        ]
        torch.testing.assert_close(torch.from_numpy(images[1]), torch.from_numpy(images[0]), rtol=0, atol=0)


def _sample(pipe: Any, family: str) -> torch.Tensor:
    prompt = qwen_prompt_embeds(1, seed=0)[0] if family == "qwen" else {"prompt": "a red circle"}
    size = 32 if family == "qwen" else 16
    out = pipe(**prompt, num_inference_steps=2, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    return torch.from_numpy(out)


@pytest.mark.parametrize("family", ["qwen", "sd3"])
@torch.no_grad()
def test_stock_diffusers_loads_a_width_merged_pipeline_as_a_ppcl_component(family: str, tmp_path: Path) -> None:
    """``DiffusionPipeline.from_pretrained`` of a saved width-merged pipeline (it failed: a stock class with the
    wrong weights): ``model_index.json`` names ppcl's component, which replays the merge; the images are exactly
    ppcl's, saving the diffusers-loaded pipeline again round-trips, and depth-only merges stay stock diffusers."""
    from diffusers import DiffusionPipeline

    folder = build_qwen(tmp_path / "base", text_encoder=False) if family == "qwen" else build_sd3(tmp_path / "base")
    base = ppcl.load_pipeline(folder).transformer
    addon = PruningAddon.from_plan(base, width_plan(base))
    _perturb(addon)
    # The tiny Qwen-Image pipeline is saved without its text encoder: diffusers wants the absent parts passed.
    kw = {"text_encoder": None, "tokenizer": None} if family == "qwen" else {}
    for level, library in (("dw", COMPONENT_MODULE), ("d", "diffusers")):
        save_merged(merge(base, addon, level), tmp_path / f"{level}-merged")
        pipe = DiffusionPipeline.from_pretrained(folder, transformer=load_merged(tmp_path / f"{level}-merged"), **kw)
        pipe.save_pretrained(tmp_path / f"{level}-pipe")
        entry = json.loads((tmp_path / f"{level}-pipe" / "model_index.json").read_text())["transformer"]
        assert entry == [library, type(base).__name__]
        loaded = DiffusionPipeline.from_pretrained(tmp_path / f"{level}-pipe", **kw)
        assert type(loaded.transformer) is type(base)
        torch.testing.assert_close(_sample(loaded, family), _sample(pipe, family), rtol=0, atol=0)
        loaded.save_pretrained(tmp_path / f"{level}-again")  # saving what diffusers loaded round-trips
        again = json.loads((tmp_path / f"{level}-again" / "model_index.json").read_text())["transformer"]
        assert again == entry
        # Only ppcl's component keeps the ControlNet mapping: diffusers loads a depth-only merge as the stock model.
        assert (tmp_path / f"{level}-again" / "transformer" / BLOCKS_FILE).is_file() == (level == "dw")
        torch.testing.assert_close(
            _sample(ppcl.load_pipeline(tmp_path / f"{level}-again"), family), _sample(pipe, family), rtol=0, atol=0
        )
    width = DiffusionPipeline.from_pretrained(tmp_path / "dw-pipe", torch_dtype=torch.bfloat16, **kw)
    assert width.transformer.dtype == torch.bfloat16 and hasattr(width.transformer, RECORD_ATTR)
    with pytest.raises(PPCLError, match="cannot be loaded with device_map"):
        DiffusionPipeline.from_pretrained(tmp_path / "dw-pipe", device_map="cpu", **kw)
