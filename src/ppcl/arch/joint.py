"""Submodule names that diffusers' MMDiT blocks share (joint attention, AdaLN-Zero joint blocks)."""

from __future__ import annotations

from ppcl.arch.spec import WidthTargets

#: Text-side parts of diffusers' joint attention (``Attention`` with ``added_kv_proj_dim``), the same in every MMDiT.
JOINT_ATTN_TEXT: tuple[str, ...] = (
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.norm_added_q",
    "attn.norm_added_k",
)
#: The part of :data:`JOINT_ATTN_TEXT` the image stream still reads (text keys and values).
JOINT_ATTN_TEXT_KV: tuple[str, ...] = ("attn.add_k_proj", "attn.add_v_proj", "attn.norm_added_k")


#: Width targets of the AdaLN-Zero joint blocks FLUX.1 (double) and SD3 share: ``norm1``/``norm1_context``
#: modulation, ``norm2``/``norm2_context`` opening the second halves, ``ff``/``ff_context`` FFNs.
JOINT_BLOCK_WIDTH = WidthTargets(
    text=("norm1_context", "norm2_context", "ff_context", *JOINT_ATTN_TEXT),
    text_kv=JOINT_ATTN_TEXT_KV,
    ffn=(("image", "ff"), ("text", "ff_context")),
    modulation=(("image", "norm1.linear"), ("text", "norm1_context.linear")),
    ffn_input=(("image", "norm2"), ("text", "norm2_context")),
)
