"""ArchSpec of diffusers ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo-1.5: 54 dual-stream blocks, 8.3B).

One stack, ``transformer_blocks``, called positionally on both paths with ``(hidden_states, encoder_hidden_states,
temb, attention_mask, freqs_cis)``. Unlike FLUX.1 and Qwen-Image, a ``HunyuanVideo15TransformerBlock`` returns
``(hidden_states, encoder_hidden_states)``: **image first**, and its joint attention concatenates [image, text].
``attention_mask`` is the text padding mask ``(B, N_txt)`` (bool; the model assembles the text sequence per sample from
the MLLM, ByT5 and image-embedding tokens and reorders the mask with it); it must not be ``None``. Every block has its
own AdaLayerNormZero modulation (``norm1``, ``norm1_context``), so a student copied from a block carries it and a depth
merge is a config rewrite (``num_layers``). The text refiner (``context_embedder.token_refiner``) is not on the depth
axis.

Width kinds are not wired for this block class yet (its width forward differs from FLUX.1's in the stream order), so
the stack is marked single-stream for width planning: plans hold depth spans only.
"""

from __future__ import annotations

from ppcl.arch.spec import ArchSpec, ModelInputs, StackSpec

HUNYUAN15_BLOCK_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "temb",
    "attention_mask",
    "freqs_cis",
    "args",
    "kwargs",
)

HUNYUAN15_SPEC = ArchSpec(
    name="hunyuanvideo15",
    model_class_name="HunyuanVideo15Transformer3DModel",
    stacks=(
        StackSpec(
            attr="transformer_blocks",
            block_class_name="HunyuanVideo15TransformerBlock",
            config_key="num_layers",
            input_names=HUNYUAN15_BLOCK_INPUTS,
            output_order=("image", "text"),
            roles=(("temb", "temb"), ("text_mask", "attention_mask"), ("rotary", "freqs_cis")),
            dual_stream=False,  # see the module docstring: no width kinds yet
        ),
    ),
    pipeline_tag="text-to-video",
    model_inputs=ModelInputs(
        batched=(
            "hidden_states",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "encoder_hidden_states_2",
            "encoder_attention_mask_2",
            "image_embeds",
            "timestep",
        ),
        text_mask="encoder_attention_mask",
        more_texts=(("encoder_hidden_states_2", "encoder_attention_mask_2"),),
    ),
)
