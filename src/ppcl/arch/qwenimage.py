"""ArchSpec of diffusers ``QwenImageTransformer2DModel`` (Qwen-Image: 60 dual-stream blocks in the real model).

The model calls its blocks with keywords normally and positionally under gradient checkpointing; each
``QwenImageTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``.
"""

from __future__ import annotations

from ppcl.arch.joint import JOINT_ATTN_TEXT, JOINT_ATTN_TEXT_KV
from ppcl.arch.spec import ArchSpec, ModelInputs, StackSpec, WidthTargets

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
    modulation=(("image", "img_mod"), ("text", "txt_mod")),
    ffn_input=(("image", "img_norm2"), ("text", "txt_norm2")),
)

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
        ),
    ),
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"),
        per_sample_lists=("img_shapes",),
        text_mask="encoder_hidden_states_mask",
    ),
)
