"""Width-pruned behaviour of the stock diffusers dual-stream blocks (METHOD.md Stage 2), without forking them.

:func:`width_forward` runs one ``QwenImageTransformerBlock``, ``FluxTransformerBlock`` or ``JointTransformerBlock``
(SD3/3.5) from its own submodules, in one of these modes (:class:`WidthMode`):

* text ``"full"``: the stock text path; ``"anchor"``: the stock path, and the modulated text features ``z_a``
  ``(B, N_txt, D)`` are stored in the run's :class:`RunContext`; ``"pruned"``: text K/V read ``z_j = z_a + L_j(z_a)``,
  the text stream passes through; ``"last"``: like ``"pruned"`` but returns ``h + L_h(h)`` as text.
* ``ffn``: streams whose second half is ``g + L(g)`` (``g`` = hidden state after the attention residual); their
  second-half shift/scale/gate rows of the modulation linear are not computed (row slices are views: no copy; a
  quantised, LoRA-wrapped or hooked modulation layer runs whole and its output is sliced).

Text-pruned blocks never compute a text query they would need: the attention runs through a view of the block's own
attention module in which the text query projection returns zeros and the text query norm / output projection are
identities. Image rows of joint attention only read text *keys and values*, so the image output is exact; the text
rows (whose output is discarded) cost attention FLOPs but no parameters. The modules a text-pruned block no longer
needs (text modulation, norms, text FFN, ``add_q_proj``, ``norm_added_q``, ``to_add_out``) are never called, so a
merged model may delete them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ppcl.arch import width_block_classes, width_forward_of
from ppcl.errors import ConfigError, UnsupportedModelError
from ppcl.modules.dispatch import compiled_function

TextMode = Literal["full", "anchor", "pruned", "last"]
TEXT_MODES: tuple[str, ...] = ("full", "anchor", "pruned", "last")


@dataclass(frozen=True)
class WidthMode:
    """How one block position runs.

    Attributes:
        text: the text-stream role (see the module docstring).
        ffn: streams whose second half is the residual linear map.
        run: id of the text run the block belongs to (``None`` when ``text == "full"``).
    """

    text: TextMode = "full"
    ffn: frozenset[str] = frozenset()
    run: str | None = None

    @property
    def text_full(self) -> bool:
        """Whether the block's own text path runs (``"full"`` or ``"anchor"``)."""
        return self.text in ("full", "anchor")


class RunContext:
    """Carries ``z_a`` ``(B, N_txt, D)`` from a run's anchor block to its later blocks during one forward pass."""

    def __init__(self) -> None:
        self.z: Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> RunContext:
        return RunContext()  # activations never travel with a copied model


@dataclass
class WidthParts:
    """The projections one block position uses: ``text_in`` = ``L_j``, ``text_out`` = ``L_h``, ``ffn[stream]``."""

    text_in: nn.Module | None = None
    text_out: nn.Module | None = None
    ffn: dict[str, nn.Module] = field(default_factory=dict)


class _ZeroQuery(nn.Module):
    """Stands in for ``add_q_proj`` in a text-pruned block: zero queries ``(B, N_txt, inner)`` and no parameters."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


_IDENTITY = nn.Identity()


class TextQueryFreeAttention:
    """A view of a joint attention module whose text query and text output path do nothing.

    Every attribute not overridden is read from the wrapped module, so the stock attention processor runs unchanged.
    """

    def __init__(self, attn: nn.Module) -> None:
        inner = int(getattr(attn, "inner_dim", 0) or attn.to_q.out_features)
        self._attn = attn
        self._overrides = {"add_q_proj": _ZeroQuery(inner), "norm_added_q": _IDENTITY, "to_add_out": _IDENTITY}

    def __getattr__(self, name: str) -> Any:
        overrides = self.__dict__["_overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_attn"], name)

    def __call__(self, **kwargs: Any) -> Any:
        # The processor directly, with the arguments it takes (what the attention's own forward does): calling
        # ``type(attn).forward(view)`` with this view as ``self`` cannot be traced by torch.compile (fullgraph).
        processor = self._attn.processor
        params = inspect.signature(processor.__call__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return processor(self, **kwargs)


def _rows(linear: nn.Module, x: Tensor, first: int, stop: int, d: int) -> Tensor:
    """Chunks ``first..stop-1`` (each ``d`` rows) of ``linear(x)``: ``(B, (stop-first)·d)``.

    A plain ``nn.Linear`` computes only those rows (weight slices are views). Any other layer runs whole and its output
    is sliced: its weight may be quantised (torchao, bitsandbytes, GGUF), carry a LoRA (peft), or be cast / onloaded by
    a hook (layerwise casting, offloading) that a direct read of ``.weight`` would bypass. ``x`` is ``(B, D)``: the
    extra rows cost one small matrix-vector product per block.
    """
    if not _is_plain_linear(linear):
        return linear(x)[:, first * d : stop * d]
    bias = None if linear.bias is None else linear.bias[first * d : stop * d]
    return F.linear(x, linear.weight[first * d : stop * d], bias)


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bare ``nn.Linear`` with a plain weight whose ``forward`` nothing wraps or hooks.

    Only type checks (torch.compile traces them): a torchao weight is its tensor subclass, a bitsandbytes one
    ``Int8Params`` / ``Params4bit``, never ``nn.Parameter`` itself; GGUF and peft layers are not ``nn.Linear``.
    """
    return (
        type(module) is nn.Linear
        and type(module.weight) is nn.Parameter
        and "forward" not in module.__dict__  # diffusers' and accelerate's hooks replace the instance's forward
        and not module._forward_pre_hooks
        and not module._forward_hooks
    )


def _clip16(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _text_input(mode: WidthMode, parts: WidthParts, ctx: RunContext | None) -> Tensor:
    if ctx is None or ctx.z is None or parts.text_in is None:
        raise ConfigError(
            "A text-pruned block ran before its run's anchor block",
            expected="the anchor block of the run to run first in the same forward pass",
            found=f"no z_a for run {mode.run!r}",
            fix="run the whole model (or the run from its anchor); do not call a pruned block alone",
        )
    return parts.text_in(ctx.z)


def _text_output(e: Tensor, mode: WidthMode, parts: WidthParts) -> Tensor:
    if mode.text == "last":
        if parts.text_out is None:
            raise ConfigError(
                "The last block of a text run has no output projection",
                expected="L_h",
                found="None",
                fix="build the add-on with PruningAddon.from_plan, which creates every projection",
            )
        return parts.text_out(e)
    return e


# ------------------------------------------------------------------------------------------------------ Qwen-Image
def _qwen(
    block: nn.Module, a: Mapping[str, Any], mode: WidthMode, parts: WidthParts, ctx: RunContext | None
) -> tuple[Tensor, Tensor]:
    h, e, temb = a["hidden_states"], a["encoder_hidden_states"], a["temb"]
    index = a.get("modulate_index")
    d = block.dim
    if "image" in mode.ffn:
        img_mod1, img_mod2 = _rows(block.img_mod[1], block.img_mod[0](temb), 0, 3, d), None
    else:
        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    img_x, img_gate1 = block._modulate(block.img_norm1(h), img_mod1, index)
    attn: Any = block.attn
    if mode.text_full:
        txt_temb = torch.chunk(temb, 2, dim=0)[0] if block.zero_cond_t else temb
        if "text" in mode.ffn:
            txt_mod1, txt_mod2 = _rows(block.txt_mod[1], block.txt_mod[0](txt_temb), 0, 3, d), None
        else:
            txt_mod1, txt_mod2 = block.txt_mod(txt_temb).chunk(2, dim=-1)
        txt_x, txt_gate1 = block._modulate(block.txt_norm1(e), txt_mod1)
        if mode.text == "anchor" and ctx is not None:
            ctx.z = txt_x
    else:
        txt_x = _text_input(mode, parts, ctx)
        attn = TextQueryFreeAttention(block.attn)
    img_attn, txt_attn = attn(
        hidden_states=img_x,
        encoder_hidden_states=txt_x,
        encoder_hidden_states_mask=a.get("encoder_hidden_states_mask"),
        image_rotary_emb=a.get("image_rotary_emb"),
        **(a.get("joint_attention_kwargs") or {}),
    )
    h = h + img_gate1 * img_attn
    if "image" in mode.ffn:
        h = parts.ffn["image"](h)
    else:
        x2, gate2 = block._modulate(block.img_norm2(h), img_mod2, index)
        h = h + gate2 * block.img_mlp(x2)
    if mode.text_full:
        e = e + txt_gate1 * txt_attn
        if "text" in mode.ffn:
            e = parts.ffn["text"](e)
        else:
            x2, gate2 = block._modulate(block.txt_norm2(e), txt_mod2)
            e = e + gate2 * block.txt_mlp(x2)
    else:
        e = _text_output(e, mode, parts)
    return _clip16(e), _clip16(h)


# ------------------------------------------------------------------------------------------------ FLUX.1 / SD3
def _ada_zero_first(norm: nn.Module, x: Tensor, temb: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """The attention half of an ``AdaLayerNormZero``: ``(modulated x, gate_msa)``; the MLP rows are not computed."""
    shift, scale, gate = _rows(norm.linear, norm.silu(temb), 0, 3, d).chunk(3, dim=1)
    return norm.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


def _second_half(
    block: nn.Module, ff: nn.Module, norm2: nn.Module, g: Tensor, shift: Tensor, scale: Tensor, gate: Tensor
) -> Tensor:
    x = norm2(g) * (1 + scale[:, None]) + shift[:, None]
    chunk = getattr(block, "_chunk_size", None)
    if chunk is not None:
        from diffusers.models.attention import _chunked_feed_forward

        out = _chunked_feed_forward(ff, x, block._chunk_dim, chunk)
    else:
        out = ff(x)
    return g + gate.unsqueeze(1) * out


def _joint(
    block: nn.Module, a: Mapping[str, Any], mode: WidthMode, parts: WidthParts, ctx: RunContext | None, *, flux: bool
) -> tuple[Tensor | None, Tensor]:
    h, e, temb = a["hidden_states"], a["encoder_hidden_states"], a["temb"]
    jak = a.get("joint_attention_kwargs") or {}
    d = h.shape[-1]
    dual = bool(getattr(block, "use_dual_attention", False))
    pre_only = bool(getattr(block, "context_pre_only", False))
    if "image" in mode.ffn:
        if dual:
            # SD3.5 norm1 chunks: msa (0-2), mlp (3-5), msa2 (6-8); only the mlp rows are dropped.
            silu = block.norm1.silu(temb)
            shift, scale, gate_msa = _rows(block.norm1.linear, silu, 0, 3, d).chunk(3, dim=1)
            # A merged model keeps only chunks 0-2 and 6-8 (rows 0..6D) of this linear.
            first2 = 3 if block.norm1.linear.out_features == 6 * d else 6
            shift2, scale2, gate_msa2 = _rows(block.norm1.linear, silu, first2, first2 + 3, d).chunk(3, dim=1)
            normed = block.norm1.norm(h)
            img_x = normed * (1 + scale[:, None]) + shift[:, None]
            img_x2 = normed * (1 + scale2[:, None]) + shift2[:, None]
        else:
            img_x, gate_msa = _ada_zero_first(block.norm1, h, temb, d)
    elif dual:
        img_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, img_x2, gate_msa2 = block.norm1(h, emb=temb)
    else:
        img_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, emb=temb)
    attn: Any = block.attn
    if mode.text_full:
        if pre_only:
            txt_x = block.norm1_context(e, temb)
        elif "text" in mode.ffn:
            txt_x, c_gate_msa = _ada_zero_first(block.norm1_context, e, temb, d)
        else:
            txt_x, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(e, emb=temb)
        if mode.text == "anchor" and ctx is not None:
            ctx.z = txt_x
    else:
        txt_x = _text_input(mode, parts, ctx)
        attn = TextQueryFreeAttention(block.attn)
    kwargs: dict[str, Any] = {"hidden_states": img_x, "encoder_hidden_states": txt_x, **jak}
    if flux:
        kwargs["image_rotary_emb"] = a.get("image_rotary_emb")
    outputs = attn(**kwargs)
    img_attn, txt_attn = outputs[0], outputs[1]
    h = h + gate_msa.unsqueeze(1) * img_attn
    if dual:
        h = h + gate_msa2.unsqueeze(1) * block.attn2(hidden_states=img_x2, **jak)
    if "image" in mode.ffn:
        h = parts.ffn["image"](h)
    else:
        h = _second_half(block, block.ff, block.norm2, h, shift_mlp, scale_mlp, gate_mlp)
    if flux and len(outputs) == 3:
        h = h + outputs[2]  # IP-adapter output, added after the FFN as in the stock block
    if pre_only:
        return None, h
    if mode.text_full:
        e = e + c_gate_msa.unsqueeze(1) * txt_attn
        if "text" in mode.ffn:
            e = parts.ffn["text"](e)
        else:
            e = _second_half(block, block.ff_context, block.norm2_context, e, c_shift_mlp, c_scale_mlp, c_gate_mlp)
    else:
        e = _text_output(e, mode, parts)
    return (_clip16(e) if flux else e), h


WIDTH_FORWARDS = {
    "qwen_mod": lambda b, a, m, p, c: _qwen(b, a, m, p, c),  # img_mod / txt_mod Sequential modulation
    "joint_rotary": lambda b, a, m, p, c: _joint(b, a, m, p, c, flux=True),  # + rotary, IP-adapter, fp16 clip
    "joint": lambda b, a, m, p, c: _joint(b, a, m, p, c, flux=False),  # AdaLayerNormZero joint block
}
"""Width forwards by name; each family's arch file says which one runs its blocks (``StackSpec.width_forward``)."""


def supported_blocks() -> tuple[str, ...]:
    """Block classes width kinds can run: those whose registered stack names a width forward."""
    return tuple(c for c in width_block_classes() if width_forward_of(c) in WIDTH_FORWARDS)


def width_forward(
    block: nn.Module, bound: Mapping[str, Any], mode: WidthMode, parts: WidthParts, ctx: RunContext | None
) -> tuple[Tensor | None, Tensor]:
    """Run ``block`` in ``mode`` on its bound ``forward`` arguments; returns ``(text, image)`` like the stock block.

    Args:
        block: a stock dual-stream block (teacher block, depth student or a merged model's pruned block).
        bound: ``{parameter name: value}`` of the call (see :meth:`ppcl.arch.ArchSpec.bind_call`).
        mode: the block's width mode.
        parts: the projections of this position.
        ctx: the text run's context (needed unless ``mode.text == "full"``).

    Raises:
        UnsupportedModelError: ``block`` is not one of :func:`supported_blocks` (e.g. a FLUX.1 single block).
    """
    fn = WIDTH_FORWARDS.get(width_forward_of(type(block).__name__) or "")
    if fn is None:
        raise UnsupportedModelError(
            f"Width pruning does not support {type(block).__name__}",
            expected=f"one of {', '.join(supported_blocks())}",
            found=type(block).__name__,
            fix="use width replacements on dual-stream blocks only",
        )
    return fn(block, bound, mode, parts, ctx)


def width_forward_carried(
    block: nn.Module, bound: Mapping[str, Any], mode: WidthMode, parts: WidthParts, z: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`width_forward` with the run's ``z_a`` ``(B, N_txt, D)`` given and returned: ``(text, image, z_a after
    the block)`` (``z_a``: ``None`` outside a run). What regional compilation compiles: no shared context object is
    an input, so blocks of any run with the same mode share one graph."""
    ctx = None if mode.run is None else RunContext()
    if ctx is not None:
        ctx.z = z
    text, image = width_forward(block, bound, mode, parts, ctx)
    return text, image, None if ctx is None else ctx.z


def run_width(
    block: nn.Module,
    bound: Mapping[str, Any],
    mode: WidthMode,
    parts: WidthParts,
    ctx: RunContext | None,
    compile_options: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`width_forward`, or, for a block compiled regionally (``compile_options``: the ``(args, kwargs)`` of
    its ``compile`` call), the compiled :func:`width_forward_carried` of its mode, with the run's ``z_a`` read from
    and written back to ``ctx`` around the call (one compiled copy per mode: see
    :func:`ppcl.modules.dispatch.compiled_function`)."""
    if compile_options is None:
        return width_forward(block, bound, mode, parts, ctx)
    carried = compiled_function(width_forward_carried, compile_options, variant=mode)
    reads = ctx is not None and not mode.text_full  # only pruned / last blocks read z_a
    text, image, z = carried(block, bound, mode, parts, ctx.z if reads else None)
    if ctx is not None:
        ctx.z = z
    return text, image
