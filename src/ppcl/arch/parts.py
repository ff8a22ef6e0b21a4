"""The parts of an :class:`~ppcl.arch.spec.ArchSpec`: one block stack (:class:`StackSpec`), the submodules width
pruning targets in its blocks (:class:`WidthTargets`) and how the model's own ``forward`` arguments relate to the batch
(:class:`ModelInputs`). Plain frozen data: everything that reads a model lives in :mod:`ppcl.arch.spec`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STREAMS: tuple[str, str] = ("image", "text")
"""The two token streams of an MMDiT block. Image tokens are ``(B, N_img, D)``, text tokens ``(B, N_txt, D)``."""


@dataclass(frozen=True)
class WidthTargets:
    """Dotted submodule names (relative to one block) that width pruning replaces.

    Attributes:
        text: every module that exists only to update the text stream (modulation, norms, text FFN, the text
            attention projections and text q/k norms). Text-stream pruning drops these.
        text_kv: the subset of ``text`` that the *image* stream still reads through joint attention (text keys and
            values). A text-pruned block must keep these.
        ffn: ``(stream, name)`` pairs naming each stream's separate feed-forward network. Empty when the block has no
            separate FFN (FLUX.1 single blocks fuse the MLP into ``proj_out``).
        modulation: ``(stream, name)`` pairs naming the linear that produces each stream's shift/scale/gate rows.
        attention_chunks: ``(chunks, kept)`` pairs: for a modulation linear of ``chunks x D`` output rows, the D-row
            chunks of its attention half, all that a block whose FFN is replaced still computes (a merged model cuts
            the linear to them). Default: 6 chunks (attention shift/scale/gate, then the MLP's) keep 0-2.
        ffn_input: ``(stream, name)`` pairs naming the norm that opens each stream's second half (norm2 → modulate →
            FFN → gate → residual): its *input* is the hidden state g after the attention residual, the point an
            FFN-to-linear replacement starts from.
        optional: names above that a block may legitimately lack (diffusers sets them to ``None`` depending on the
            config, e.g. ``qk_norm=None`` or SD3's last block). Only these are filtered out when resolving; a missing
            name not listed here is a spec bug and raises.
    """

    text: tuple[str, ...] = ()
    text_kv: tuple[str, ...] = ()
    ffn: tuple[tuple[str, str], ...] = ()
    modulation: tuple[tuple[str, str], ...] = ()
    ffn_input: tuple[tuple[str, str], ...] = ()
    attention_chunks: tuple[tuple[int, tuple[int, ...]], ...] = ((6, (0, 1, 2)),)
    optional: frozenset[str] = frozenset()

    def names(self) -> tuple[str, ...]:
        """All distinct names, in declaration order."""
        seen: dict[str, None] = {}
        pairs = (*self.ffn, *self.modulation, *self.ffn_input)
        for name in (*self.text, *self.text_kv, *(n for _, n in pairs)):
            seen.setdefault(name, None)
        return tuple(seen)

    def attention_rows(self, chunks: int) -> tuple[int, ...]:
        """The attention-half chunks of a modulation linear with ``chunks`` output chunks (see ``attention_chunks``)."""
        kept = dict(self.attention_chunks).get(chunks)
        if kept is None:
            raise ValueError(f"no attention-half layout for a {chunks}-chunk modulation: {self.attention_chunks}")
        return kept

    def ffn_of(self, stream: str) -> str | None:
        """Name of ``stream``'s FFN, or ``None`` when there is no separate one."""
        return dict(self.ffn).get(stream)


@dataclass(frozen=True)
class ModelInputs:
    """How the model's own ``forward`` arguments relate to the batch, for capturing and replaying calibration inputs.

    Attributes:
        batched: tensor arguments whose first dimension is the batch (split and concatenated per sample).
        shared: tensor arguments shared by the whole batch (e.g. FLUX.1 ``img_ids``); equal across captured calls.
        per_sample_lists: list arguments with one entry per sample (Qwen-Image ``img_shapes``).
        text: the prompt-embedding argument ``(B, T, D_text)``.
        text_mask: its padding mask ``(B, T)`` when the model takes one (Qwen-Image); then prompts of different
            lengths can share a batch by padding with masked tokens.
        more_texts: further ``(embedding, mask)`` argument pairs padded the same way (HunyuanVideo-1.5's ByT5
            prompt embeddings next to its MLLM ones).
    """

    batched: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "timestep")
    shared: tuple[str, ...] = ()
    per_sample_lists: tuple[str, ...] = ()
    text: str = "encoder_hidden_states"
    text_mask: str | None = None
    more_texts: tuple[tuple[str, str], ...] = ()

    def text_pairs(self) -> tuple[tuple[str, str | None], ...]:
        """Every ``(prompt embedding, padding mask or None)`` argument pair, the main one first."""
        return ((self.text, self.text_mask), *self.more_texts)


@dataclass(frozen=True)
class ControlNetInput:
    """How the model adds a ControlNet's residuals to one stack: after block ``i`` of ``N``, residual ``k(i)`` of the
    ``L`` passed in ``argument`` is added to the image stream.

    Attributes:
        argument: the model ``forward`` keyword holding the list of ``L`` residuals, each ``(B, N_img, D)``.
        spacing: ``"ceil"``: ``k = i // ceil(N / L)`` (FLUX.1, Qwen-Image); ``"ratio"``: ``k = int(i / (N / L))``
            (SD3).
        repeat_argument: a boolean ``forward`` keyword that switches to ``k = i % L`` (FLUX.1's XLabs ControlNets).
        skip_flag: a boolean block attribute; a block where it is true gets no residual (SD3: ``context_pre_only``).
    """

    argument: str
    spacing: str = "ceil"
    repeat_argument: str | None = None
    skip_flag: str | None = None

    def residual_index(self, i: int, size: int, count: int, repeat: bool = False) -> int:
        """``k(i)`` for block ``i`` of a stack of ``size`` blocks given ``count`` residuals, as the model computes it."""
        if repeat:
            return i % count
        if self.spacing == "ratio":
            return int(i / (size / count))  # float division, exactly as the model does it
        return i // math.ceil(size / count)


@dataclass(frozen=True)
class StackSpec:
    """One ``nn.ModuleList`` of blocks on the model.

    Attributes:
        attr: attribute of the model holding the ``nn.ModuleList`` (e.g. ``"transformer_blocks"``).
        block_class_name: class name of its blocks, checked by :meth:`ArchSpec.validate`.
        config_key: config entry holding the number of blocks in this stack (e.g. ``"num_layers"``).
        input_names: parameter names of the block's ``forward``, in positional order. The model may call a block
            with keywords (normal path) or positionally (gradient-checkpointing path); both bind through these.
        stream_inputs: ``(stream, parameter name)`` pairs: which parameter carries which stream.
        output_order: stream names in the order the block returns its tensors.
        roles: ``(role, parameter name)`` pairs for shared conditioning: ``temb``, ``rotary``, ``text_mask``,
            ``attention_kwargs``, ``modulate_index``; absent roles are not taken by this block.
        bare_output: the block returns its one output stream as a bare tensor, not a tuple (Wan: the video tokens;
            the text context is read by cross-attention and never returned). ``output_order`` then names one stream.
        joined_text: the image-stream argument carries the ``[text; image]`` tokens concatenated along dim 1 and the
            text argument is ``None`` (FLUX.2 single blocks: the model joins the streams before the stack and keeps
            the image rows after it). Recording, passthrough and distillation treat the joint sequence as the image
            stream (later blocks read every row, so a student must reproduce them all); the analysis splits it at the
            model input's text length (:meth:`ArchSpec.unjoin`) so token rows line up with the other stacks'.
        dual_stream: whether the block has separate weights per stream. FLUX.1 single blocks are single-stream (one
            set of weights over the concatenated ``[text, image]`` tokens) but still take and return the two streams
            as separate tensors, so passthrough and recording treat them exactly like dual-stream blocks.
        text_output_flag: a boolean block attribute that, when true, means the block returns ``None`` for the text
            stream (SD3's last block, ``context_pre_only=True``).
        index_config_keys: config entries holding lists of *local* indices into this stack that must be re-indexed
            when blocks are removed (SD3.5 ``dual_attention_layers``).
        width: submodules width pruning targets in these blocks.
        width_forward: the name of the forward that runs these blocks in a width mode (a key of
            :data:`ppcl.modules.width.WIDTH_FORWARDS`: ``"qwen_mod"``, ``"joint"``, ``"joint_rotary"``); ``None``
            when width kinds do not apply to them.
        controlnet: how the model adds ControlNet residuals after this stack's blocks; ``None``: it takes none.
    """

    attr: str
    block_class_name: str
    config_key: str
    input_names: tuple[str, ...]
    stream_inputs: tuple[tuple[str, str], ...] = (("image", "hidden_states"), ("text", "encoder_hidden_states"))
    output_order: tuple[str, ...] = ("text", "image")
    roles: tuple[tuple[str, str], ...] = ()
    bare_output: bool = False
    joined_text: bool = False
    dual_stream: bool = True
    text_output_flag: str | None = None
    index_config_keys: tuple[str, ...] = ()
    width: WidthTargets = field(default_factory=WidthTargets)
    width_forward: str | None = None
    controlnet: ControlNetInput | None = None

    def input_name(self, stream_or_role: str) -> str | None:
        """Parameter name carrying a stream (``"image"``/``"text"``) or a role (``"temb"``...), or ``None``."""
        return dict(self.stream_inputs).get(stream_or_role) or dict(self.roles).get(stream_or_role)
