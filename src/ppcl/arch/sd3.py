"""ArchSpec of diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5 MMDiT).

Every ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``, except the last one: the model
builds block ``num_layers - 1`` with ``context_pre_only=True`` (no text FFN, no text output projection), and it
returns ``(None, hidden_states)``. Because the config decides that by position, a depth-pruned SD3 must keep its last
block (``protect_last_block``). SD3.5 lists the blocks with a second, image-only attention in
``dual_attention_layers``; those indices are renumbered when blocks are removed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ppcl.arch.joint import JOINT_BLOCK_WIDTH
from ppcl.arch.latents import Cast, LatentFormat
from ppcl.arch.spec import ArchSpec, ControlNetInput, ModelInputs, StackSpec

SD3_BLOCK_INPUTS: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")

SD3_WIDTH = replace(
    JOINT_BLOCK_WIDTH,
    # q/k norms exist only with `qk_norm` set (SD3.5); the last block has no text FFN and no text output projection.
    optional=frozenset({"attn.norm_added_q", "attn.norm_added_k", "norm2_context", "ff_context", "attn.to_add_out"}),
    # SD3.5 dual-attention blocks: norm1 yields msa (0-2), mlp (3-5), msa2 (6-8); both attention halves stay.
    attention_chunks=((6, (0, 1, 2)), (9, (0, 1, 2, 6, 7, 8))),
)


class SD3Latents(LatentFormat):
    """SD3/3.5: ``(z - shift_factor) * scaling_factor``, unpacked latents (the transformer patchifies), CLIP pooled +
    joint embeddings, timestep ``σ · 1000`` (float32, like the scheduler's timesteps the pipeline passes)."""

    max_shift_default = 1.16  # the SD3 pipeline's default

    def token_patch(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["patch_size"])

    def encode_prompts(self, pipe: Any, prompts: list[str], kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=pipe._execution_device,
            do_classifier_free_guidance=False,
            **kwargs,
        )
        return [{"prompt_embeds": pe[i].cpu(), "pooled_prompt_embeds": pooled[i].cpu()} for i in range(len(pe))]

    def model_inputs(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        data: dict[str, torch.Tensor],
        transformer: dict[str, Any],
        cast: Cast,
    ) -> dict[str, Any]:
        return {
            "hidden_states": cast(x_t),
            "encoder_hidden_states": cast(data["prompt_embeds"]),
            "pooled_projections": cast(data["pooled_prompt_embeds"]),
            "timestep": sigma * 1000,
        }


SD3_SPEC = ArchSpec(
    name="sd3",
    model_class_name="SD3Transformer2DModel",
    stacks=(
        StackSpec(
            attr="transformer_blocks",
            block_class_name="JointTransformerBlock",
            config_key="num_layers",
            input_names=SD3_BLOCK_INPUTS,
            roles=(("temb", "temb"), ("attention_kwargs", "joint_attention_kwargs")),
            text_output_flag="context_pre_only",
            index_config_keys=("dual_attention_layers",),
            width=SD3_WIDTH,
            width_forward="joint",
            controlnet=ControlNetInput("block_controlnet_hidden_states", spacing="ratio", skip_flag="context_pre_only"),
        ),
    ),
    protect_last_block=True,
    model_inputs=ModelInputs(batched=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    latents=SD3Latents(),
)
