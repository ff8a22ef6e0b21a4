"""ArchSpec of diffusers ``QwenImageTransformer2DModel`` (Qwen-Image: 60 dual-stream blocks in the real model).

The model calls its blocks with keywords normally and positionally under gradient checkpointing; each
``QwenImageTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ppcl.arch.joint import JOINT_ATTN_TEXT, JOINT_ATTN_TEXT_KV
from ppcl.arch.latents import Cast, LatentFormat, pack_2x2
from ppcl.arch.spec import ArchSpec, ControlNetInput, ModelInputs, StackSpec, WidthTargets

QWENIMAGE_BLOCK_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "encoder_hidden_states_mask",
    "temb",
    "image_rotary_emb",
    "joint_attention_kwargs",
    "modulate_index",
)

QWENIMAGE_WIDTH = WidthTargets(
    text=("txt_mod", "txt_norm1", "txt_norm2", "txt_mlp", *JOINT_ATTN_TEXT),
    text_kv=JOINT_ATTN_TEXT_KV,
    ffn=(("image", "img_mlp"), ("text", "txt_mlp")),
    modulation=(("image", "img_mod.1"), ("text", "txt_mod.1")),  # Sequential(SiLU, Linear)
    ffn_input=(("image", "img_norm2"), ("text", "txt_norm2")),
)


class QwenImageLatents(LatentFormat):
    """Qwen-Image: per-channel ``(z - latents_mean) / latents_std`` of a video VAE (one frame), 2x2-packed latents,
    Qwen2.5-VL embeddings cut to their unmasked length (the reader pads them back with a mask), timestep σ."""

    def normalisation(self, vae_config: Any) -> dict[str, Any]:
        return {
            "kind": "(z - latents_mean) / latents_std",
            "latents_mean": list(vae_config.latents_mean),
            "latents_std": list(vae_config.latents_std),
        }

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            z = vae.encode(x.unsqueeze(2)).latent_dist.mode()  # (B, C, 1, h, w)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return ((z - mean) / std)[:, :, 0].float().cpu()

    def encode_prompts(self, pipe: Any, prompts: list[str], kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        pe, mask = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, **kwargs)
        lengths = [pe.shape[1]] * len(pe) if mask is None else mask.sum(1).tolist()
        return [{"prompt_embeds": pe[i, :n].cpu()} for i, n in enumerate(lengths)]

    def unpack_generated(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]  # (B, C, 1, h, w) → 4-D

    def model_inputs(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        data: dict[str, torch.Tensor],
        transformer: dict[str, Any],
        cast: Cast,
    ) -> dict[str, Any]:
        b, _, h, w = x_t.shape
        return {
            "hidden_states": cast(pack_2x2(x_t)),
            "encoder_hidden_states": cast(data["prompt_embeds"]),
            "encoder_hidden_states_mask": data["prompt_embeds_mask"],
            "timestep": cast(sigma),
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
        }


QWENIMAGE_SPEC = ArchSpec(
    name="qwenimage",
    model_class_name="QwenImageTransformer2DModel",
    stacks=(
        StackSpec(
            attr="transformer_blocks",
            block_class_name="QwenImageTransformerBlock",
            config_key="num_layers",
            input_names=QWENIMAGE_BLOCK_INPUTS,
            roles=(
                ("text_mask", "encoder_hidden_states_mask"),
                ("temb", "temb"),
                ("rotary", "image_rotary_emb"),
                ("attention_kwargs", "joint_attention_kwargs"),
                ("modulate_index", "modulate_index"),
            ),
            width=QWENIMAGE_WIDTH,
            width_forward="qwen_mod",
            controlnet=ControlNetInput("controlnet_block_samples"),
        ),
    ),
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"),
        per_sample_lists=("img_shapes",),
        text_mask="encoder_hidden_states_mask",
    ),
    latents=QwenImageLatents(),
    cfg_argument="true_cfg_scale",  # its guidance_scale only feeds guidance-distilled variants
    negative_prompt_default=" ",  # true CFG is off without a negative prompt; diffusers' docs suggest " "
)
