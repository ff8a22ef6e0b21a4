"""ArchSpec of diffusers ``FluxTransformer2DModel`` (FLUX.1: 19 double-stream then 38 single-stream blocks).

Both stacks form one flat depth axis (57 blocks in the real model). Single-stream blocks concatenate ``[text, image]``
tokens internally but take and return the two streams as separate tensors, exactly like the double-stream blocks:
both return ``(encoder_hidden_states, hidden_states)``. Their MLP is fused into ``proj_out`` (input = attention output
concatenated with the MLP branch), so they have no separate FFN width target.
"""

from __future__ import annotations

from ppcl.arch.joint import JOINT_BLOCK_WIDTH
from ppcl.arch.spec import ArchSpec, ModelInputs, StackSpec, WidthTargets

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
FLUX_SINGLE_WIDTH = WidthTargets(modulation=(("image", "norm"), ("text", "norm")))

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
        ),
        StackSpec(
            attr="single_transformer_blocks",
            block_class_name="FluxSingleTransformerBlock",
            config_key="num_single_layers",
            input_names=FLUX_BLOCK_INPUTS,
            roles=_FLUX_ROLES,
            dual_stream=False,
            width=FLUX_SINGLE_WIDTH,
        ),
    ),
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
        shared=("img_ids", "txt_ids"),
    ),
)
