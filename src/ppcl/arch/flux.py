"""ArchSpec of diffusers ``FluxTransformer2DModel`` (FLUX.1: 19 double-stream then 38 single-stream blocks).

Both stacks form one flat depth axis (57 blocks in the real model). Single-stream blocks concatenate ``[text, image]``
tokens internally but take and return the two streams as separate tensors, exactly like the double-stream blocks:
both return ``(encoder_hidden_states, hidden_states)``. Their MLP is fused into ``proj_out`` (input = attention output
concatenated with the MLP branch), so they have no separate FFN width target.
"""

from __future__ import annotations

from typing import Any

import torch

from ppcl.arch.joint import JOINT_BLOCK_WIDTH
from ppcl.arch.latents import Cast, LatentFormat, pack_2x2
from ppcl.arch.spec import ArchSpec, ControlNetInput, ModelInputs, StackSpec, WidthTargets

FLUX_BLOCK_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "temb",
    "image_rotary_emb",
    "joint_attention_kwargs",
)

_FLUX_ROLES: tuple[tuple[str, str], ...] = (
    ("temb", "temb"),
    ("rotary", "image_rotary_emb"),
    ("attention_kwargs", "joint_attention_kwargs"),
)

FLUX_DOUBLE_WIDTH = JOINT_BLOCK_WIDTH

# One set of weights serves both streams: nothing is text-only, and the MLP (proj_mlp + act_mlp) is fused into
# proj_out, so there is no separate FFN to replace.
FLUX_SINGLE_WIDTH = WidthTargets(modulation=(("image", "norm.linear"), ("text", "norm.linear")))


class FluxLatents(LatentFormat):
    """FLUX.1: ``(z - shift_factor) * scaling_factor``, 2x2-packed latents with ``img_ids`` / ``txt_ids``, CLIP pooled
    + T5 embeddings, timestep σ (``guidance`` is added by the data source when the model embeds it)."""

    def encode_prompts(self, pipe: Any, prompts: list[str], kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device, **kwargs)
        return [{"prompt_embeds": pe[i].cpu(), "pooled_prompt_embeds": pooled[i].cpu()} for i in range(len(pe))]

    def unpack_generated(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def model_inputs(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        data: dict[str, torch.Tensor],
        transformer: dict[str, Any],
        cast: Cast,
    ) -> dict[str, Any]:
        from diffusers import FluxPipeline

        b, _, h, w = x_t.shape
        return {
            "hidden_states": cast(pack_2x2(x_t)),
            "encoder_hidden_states": cast(data["prompt_embeds"]),
            "pooled_projections": cast(data["pooled_prompt_embeds"]),
            "timestep": cast(sigma),
            "img_ids": cast(FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)),
            "txt_ids": cast(torch.zeros(data["prompt_embeds"].shape[1], 3)),
        }


FLUX_SPEC = ArchSpec(
    name="flux",
    model_class_name="FluxTransformer2DModel",
    stacks=(
        StackSpec(
            attr="transformer_blocks",
            block_class_name="FluxTransformerBlock",
            config_key="num_layers",
            input_names=FLUX_BLOCK_INPUTS,
            roles=_FLUX_ROLES,
            width=FLUX_DOUBLE_WIDTH,
            width_forward="joint_rotary",
            controlnet=ControlNetInput("controlnet_block_samples", repeat_argument="controlnet_blocks_repeat"),
        ),
        StackSpec(
            attr="single_transformer_blocks",
            block_class_name="FluxSingleTransformerBlock",
            config_key="num_single_layers",
            input_names=FLUX_BLOCK_INPUTS,
            roles=_FLUX_ROLES,
            dual_stream=False,
            width=FLUX_SINGLE_WIDTH,
            controlnet=ControlNetInput("controlnet_single_block_samples"),
        ),
    ),
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
        shared=("img_ids", "txt_ids"),
    ),
    latents=FluxLatents(),
)
