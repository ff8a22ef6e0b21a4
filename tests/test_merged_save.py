"""A merged model saved the diffusers way keeps what makes it loadable (issue 16): ``save_pretrained`` of a merged
transformer, or of a pipeline holding one, also writes ``ppcl_merged.json`` (width merges), ``ppcl_blocks.json`` and
the card, so ``ppcl.load_pipeline`` / ``ppcl.load_merged`` load the folder back. Before, a width-merged pipeline's
``save_pretrained`` wrote a folder neither diffusers nor ppcl could load, and a depth-merged one lost its ControlNet
mapping."""

from __future__ import annotations

from pathlib import Path

import torch

import ppcl
from ppcl.addon import PruningAddon
from ppcl.runtime import BLOCKS_FILE, MERGED_FILE, load_merged, merge, save_merged
from test_addon_width import _perturb, width_plan
from tiny_models import build_tiny, two_span_plan
from tiny_pipelines import build_qwen, qwen_prompt_embeds


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
