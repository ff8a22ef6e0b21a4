"""CalibrationSet: capture from the toy sampler and from a tiny local Qwen-Image pipeline; save/load; checks."""

from __future__ import annotations

import json

import pytest
import torch

from ppcl.data.calibration import CalibrationSet
from ppcl.data.pipeline_capture import calibrate_pipeline, spread_steps
from ppcl.errors import ArtefactError, ConfigError
from ppcl.toy.calibrate import calibrate_toy, calibrate_toy_prompts
from ppcl.toy.sampler import SamplerConfig
from ppcl.toy.teacher import TEACHER_CONFIG, ToyTeacher

TINY = {
    **TEACHER_CONFIG,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "axes_dims_rope": (4, 6, 6),
}


@pytest.fixture(scope="module")
def toy():
    return ToyTeacher.build(seed=0, config=TINY)


def test_toy_capture_shapes_and_replay(toy, tmp_path):
    sampler = SamplerConfig(steps=5, guidance=3.0)
    calib = calibrate_toy(toy, num_prompts=3, seeds=(0, 1), n_timesteps=3, sampler=sampler)
    assert len(calib) == 3 * 2 * 3 * 2  # prompts x seeds x timesteps x (cond, uncond)
    assert calib.batched["hidden_states"].shape == (36, 64, 48)
    assert sorted(set(calib.batched["timestep"].tolist())) == pytest.approx([0.2, 0.6, 1.0])
    assert calib.meta["timesteps"] == [1.0, 0.6, 0.2]
    calib.save(tmp_path / "cal")
    loaded = CalibrationSet.load(tmp_path / "cal")
    assert loaded.content_hash == calib.content_hash
    batch = next(loaded.batches(8))
    out = toy.transformer(**batch, return_dict=False)[0]
    assert out.shape == (8, 64, 48)
    loaded.check_model(toy.transformer)


def test_capture_is_deterministic_and_hash_sensitive(toy):
    sampler = SamplerConfig(steps=3)
    a = calibrate_toy_prompts(toy, ["a red circle"], (0,), 2, sampler)
    b = calibrate_toy_prompts(toy, ["a red circle"], (0,), 2, sampler)
    c = calibrate_toy_prompts(toy, ["a red circle"], (1,), 2, sampler)
    assert a.content_hash == b.content_hash != c.content_hash


def test_tampered_or_foreign_sets_are_refused(toy, tmp_path):
    calib = calibrate_toy_prompts(toy, ["a blue square"], (0,), 1, SamplerConfig(steps=2))
    calib.save(tmp_path / "cal")
    manifest = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    manifest["content_hash"] = "0" * 64
    (tmp_path / "cal" / "calibration.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="does not match"):
        CalibrationSet.load(tmp_path / "cal")
    other = ToyTeacher.build(seed=0, config={**TINY, "num_layers": 3}).transformer
    with pytest.raises(ArtefactError, match="another model"):
        calib.check_model(other)
    (tmp_path / "cal" / "calibration.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtefactError, match="unreadable"):
        CalibrationSet.load(tmp_path / "cal", verify=False)


def test_bad_requests_are_clear_errors(toy):
    with pytest.raises(ConfigError, match="empty"):
        calibrate_toy_prompts(toy, [], (0,))
    with pytest.raises(ConfigError, match="vocabulary"):
        calibrate_toy_prompts(toy, ["a purple circle"], (0,))
    with pytest.raises(ConfigError, match="out of range"):
        spread_steps(30, 20)


def _tiny_qwen_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    # No tokenizer or text encoder: the pipeline takes prompt embeddings directly (nothing to download).
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )


def test_qwen_pipeline_capture_pads_prompts_of_different_lengths(tmp_path):
    pipe = _tiny_qwen_pipeline()
    g = torch.Generator().manual_seed(1)
    embeds = [
        {
            "prompt_embeds": torch.randn(1, n, 16, generator=g),
            "prompt_embeds_mask": torch.ones(1, n, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 3, 16, generator=g),
            "negative_prompt_embeds_mask": torch.ones(1, 3, dtype=torch.long),
        }
        for n in (5, 4)
    ]
    calib = calibrate_pipeline(
        pipe,
        prompt_embeds=embeds,
        seeds=(0,),
        num_inference_steps=4,
        n_timesteps=2,
        height=32,
        width=32,
        true_cfg_scale=2.0,
    )
    # 2 prompts x 2 kept steps x (cond, negative) calls of batch 1
    assert len(calib) == 8
    assert calib.batched["encoder_hidden_states"].shape == (8, 5, 16)
    assert calib.batched["encoder_hidden_states_mask"].sum(1).tolist() == [5, 3, 5, 3, 4, 3, 4, 3]
    assert calib.meta["kept_steps"] == [0, 3]
    calib.save(tmp_path / "cal")
    loaded = CalibrationSet.load(tmp_path / "cal")
    # Padding is masked: replaying a padded sample gives the unpadded call's output.
    batch = next(loaded.batches(1))
    padded = pipe.transformer(**batch, return_dict=False)[0]
    trimmed = {
        **batch,
        "encoder_hidden_states": batch["encoder_hidden_states"][:, :5],
        "encoder_hidden_states_mask": batch["encoder_hidden_states_mask"][:, :5],
    }
    torch.testing.assert_close(padded, pipe.transformer(**trimmed, return_dict=False)[0])
    second = list(loaded.batches(1))[1]
    short = {
        **second,
        "encoder_hidden_states": second["encoder_hidden_states"][:, :3],
        "encoder_hidden_states_mask": second["encoder_hidden_states_mask"][:, :3],
    }
    torch.testing.assert_close(
        pipe.transformer(**second, return_dict=False)[0],
        pipe.transformer(**short, return_dict=False)[0],
        rtol=1e-4,
        atol=1e-5,
    )
