"""ArchSpec of diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 video DiT: 40 blocks at 14B, 30 at 1.3B / 5B).

One stack, ``blocks``, called positionally on both the normal and the gradient-checkpointing path with
``(hidden_states, encoder_hidden_states, temb, rotary_emb)``. A ``WanTransformerBlock`` returns only the video
tokens ``(B, N, D)``: the text context (UMT5 embeddings, ``(B, 512, D)``, no mask; with the CLIP image context
prepended for I2V) is read by the cross-attention of every block and never updated, so the text stream has no outputs
(like SD3's last block, everywhere), text-run pruning does not apply and depth spans are the pruning kind. ``temb`` is
the projected timestep ``(B, 6, D)`` (``(B, N, 6, D)`` for Wan2.2 TI2V), the same for every block; each block adds
its own ``scale_shift_table`` parameter, so a student copied from a block carries its modulation with it and a depth
merge is a config rewrite (``num_layers``). Wan2.2-A14B is two such transformers (high- and low-noise experts):
prune each as its own model.
"""

from __future__ import annotations

from ppcl.arch.spec import ArchSpec, ModelInputs, StackSpec

WAN_BLOCK_INPUTS: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")

WAN_SPEC = ArchSpec(
    name="wan",
    model_class_name="WanTransformer3DModel",
    stacks=(
        StackSpec(
            attr="blocks",
            block_class_name="WanTransformerBlock",
            config_key="num_layers",
            input_names=WAN_BLOCK_INPUTS,
            output_order=("image",),
            bare_output=True,
            roles=(("temb", "temb"), ("rotary", "rotary_emb")),
            dual_stream=False,
        ),
    ),
    pipeline_tag="text-to-video",
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image"),
    ),
)
