"""Architecture knowledge as data: where a transformer's blocks live, how they are called and what they return.

An :class:`ArchSpec` names the block stacks of one diffusers transformer class (in execution order, forming one flat
depth axis), the parameter names of each block's ``forward``, the order of the tensors a block returns, the two token
streams (``"image"`` and ``"text"``) and the submodules later width-pruning stages target. Everything that depends on a
particular model (counts, the SD3 last-block special case) is read from the model or its config at call time, so one
spec serves every size of that architecture, including depth-pruned ones.

Flat block index ``i`` runs over all stacks in order: for FLUX.1 (19 double + 38 single blocks) ``i = 0..18`` are
``transformer_blocks[0..18]`` and ``i = 19..56`` are ``single_transformer_blocks[0..37]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ppcl.arch import pruning
from ppcl.arch.latents import LatentFormat
from ppcl.arch.parts import STREAMS, ControlNetInput, ModelInputs, StackSpec, WidthTargets
from ppcl.errors import ConfigError, UnsupportedModelError

__all__ = ["STREAMS", "ArchSpec", "ControlNetInput", "ModelInputs", "StackSpec", "WidthTargets"]


@dataclass(frozen=True)
class ArchSpec:
    """Everything ppcl needs to know about one diffusers transformer class.

    Attributes:
        name: short architecture name (``"qwenimage"``, ``"flux"``, ``"sd3"``).
        model_class_name: the diffusers class name this spec applies to.
        stacks: the block stacks in execution order; together they form the flat depth axis.
        protect_last_block: the last flat block is built differently from the others (SD3: ``context_pre_only``), so a
            depth-pruned model must keep it: removing it would change which block the config builds that way.
        streams: the token streams, always ``("image", "text")``.
        model_inputs: which arguments of the model's ``forward`` are per-sample, shared or per-sample lists.
        latents: the pipeline's latent conventions (:mod:`ppcl.arch.latents`), ``None`` when ppcl has none.
        cfg_argument: the pipeline call argument that sets the classifier-free guidance scale.
        pipeline_tag: the Hub task of the family's pipelines (model cards).
        negative_prompt_default: the negative prompt to pass when guidance is asked for and none is given, for a
            pipeline whose CFG runs only with one (Qwen-Image's true CFG); ``None``: the pipeline's own default.
    """

    name: str
    model_class_name: str
    stacks: tuple[StackSpec, ...]
    protect_last_block: bool = False
    streams: tuple[str, ...] = STREAMS
    model_inputs: ModelInputs = field(default_factory=ModelInputs)
    latents: LatentFormat | None = None
    cfg_argument: str = "guidance_scale"
    negative_prompt_default: str | None = None
    pipeline_tag: str = "text-to-image"

    def latent_format(self) -> LatentFormat:
        """The family's :class:`~ppcl.arch.latents.LatentFormat`; raises when ppcl cannot cache its latents."""
        if self.latents is None:
            raise UnsupportedModelError(
                f"ppcl has no latent format for {self.model_class_name}",
                expected="a family with a latent format (FLUX.1, SD3/3.5, Qwen-Image)",
                found=self.name,
                fix="calibrate and distil from prompts (ppcl calibrate --prompts), or add the family's LatentFormat",
            )
        return self.latents

    # ----------------------------------------------------------------------------------------------- block access
    def stack_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        """The model's block lists, one per stack, in execution order."""
        lists = []
        for stack in self.stacks:
            blocks = getattr(model, stack.attr, None)
            if not isinstance(blocks, nn.ModuleList):
                raise UnsupportedModelError(
                    f"The model has no block list `{stack.attr}`",
                    expected=f"a {self.model_class_name} with an nn.ModuleList `{stack.attr}`",
                    found=type(model).__name__,
                    fix="pass the bare diffusers transformer (not a pipeline or a wrapper such as DDP/torch.compile)",
                )
            lists.append(blocks)
        return lists

    def stack_sizes(self, model: nn.Module) -> list[int]:
        """Number of blocks in each stack of ``model``."""
        return [len(blocks) for blocks in self.stack_lists(model)]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The flat, ordered list of all blocks (length :meth:`num_blocks`)."""
        return [block for blocks in self.stack_lists(model) for block in blocks]

    def num_blocks(self, model: nn.Module) -> int:
        """Total number of blocks over all stacks."""
        return sum(self.stack_sizes(model))

    def locate(self, model: nn.Module, i: int) -> tuple[str, int]:
        """``(stack attr, local index)`` of flat block ``i``; negative ``i`` counts from the end."""
        stack_index, local = _locate(self.stack_sizes(model), i)
        return self.stacks[stack_index].attr, local

    def stack_of(self, model: nn.Module, i: int) -> StackSpec:
        """The :class:`StackSpec` flat block ``i`` belongs to."""
        return self.stacks[_locate(self.stack_sizes(model), i)[0]]

    def block(self, model: nn.Module, i: int) -> nn.Module:
        """Flat block ``i``."""
        stack_index, local = _locate(self.stack_sizes(model), i)
        return self.stack_lists(model)[stack_index][local]

    def block_name(self, model: nn.Module, i: int) -> str:
        """Qualified module name of flat block ``i`` (e.g. ``"single_transformer_blocks.3"``)."""
        attr, local = self.locate(model, i)
        return f"{attr}.{local}"

    # ---------------------------------------------------------------------------------------- calls and outputs
    def bind_call(self, model: nn.Module, i: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Map a call of block ``i`` (positional and/or keyword) to ``{parameter name: value}``."""
        names = self.stack_of(model, i).input_names
        if len(args) > len(names):
            raise ConfigError(
                f"Block {i} was called with too many positional arguments",
                expected=f"at most {len(names)} ({', '.join(names)})",
                found=str(len(args)),
                fix="call the block as the diffusers model does, or update the ArchSpec for this diffusers version",
            )
        bound = dict(zip(names, args, strict=False))
        clash = bound.keys() & kwargs.keys()
        if clash:
            raise ConfigError(
                f"Block {i} got {sorted(clash)} both positionally and as keywords",
                expected="each argument once",
                found=f"args={len(args)}, kwargs={sorted(kwargs)}",
            )
        bound.update(kwargs)
        return bound

    def split_inputs(
        self, model: nn.Module, i: int, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The streams of one block call: ``{"image": (B, N_img, D), "text": (B, N_txt, D)}``."""
        bound = self.bind_call(model, i, args, kwargs)
        out = {}
        for stream, name in self.stack_of(model, i).stream_inputs:
            if name not in bound:
                raise ConfigError(
                    f"Block {i} was called without its {stream} stream `{name}`",
                    expected=f"`{name}` positionally or as a keyword",
                    found=f"{len(args)} positional, keywords {sorted(kwargs)}",
                )
            out[stream] = bound[name]
        return out

    def output_order(self, model: nn.Module, i: int) -> tuple[str, ...]:
        """Stream names in the order block ``i`` returns them (``("text", "image")`` for all supported models)."""
        return self.stack_of(model, i).output_order

    def returns_text(self, model: nn.Module, i: int) -> bool:
        """Whether block ``i`` returns a text tensor (``False`` for SD3's ``context_pre_only`` last block and for blocks
        whose outputs hold no text stream, e.g. Wan's)."""
        stack = self.stack_of(model, i)
        if "text" not in stack.output_order:
            return False
        flag = stack.text_output_flag
        return not (flag is not None and bool(getattr(self.block(model, i), flag, False)))

    def split_outputs(self, model: nn.Module, i: int, output: Sequence[Any]) -> dict[str, torch.Tensor | None]:
        """``{"image": (B, N_img, D), "text": (B, N_txt, D) or None}`` from what block ``i`` returned."""
        order = self.output_order(model, i)
        if self.stack_of(model, i).bare_output:
            if not isinstance(output, torch.Tensor):
                raise ConfigError(
                    f"Block {i} returned an unexpected value",
                    expected=f"one tensor (the {order[0]} stream)",
                    found=type(output).__name__,
                    fix="update the ArchSpec for this diffusers version",
                )
            return {"text": None, order[0]: output}
        if not isinstance(output, tuple | list) or len(output) != len(order):
            raise ConfigError(
                f"Block {i} returned an unexpected value",
                expected=f"a tuple of {len(order)} tensors ordered {order}",
                found=type(output).__name__ if not isinstance(output, tuple | list) else f"{len(output)} values",
                fix="update the ArchSpec for this diffusers version",
            )
        return dict(zip(order, output, strict=True))

    def join_outputs(self, model: nn.Module, i: int, streams: Mapping[str, torch.Tensor | None]) -> Any:
        """Inverse of :meth:`split_outputs`: a tuple shaped like block ``i``'s own return value (a bare tensor for a
        ``bare_output`` stack).

        The text slot is ``None`` when block ``i`` returns no text, whatever ``streams`` holds, so a replacement of
        SD3's last block hands the model exactly what the original did.
        """
        order = self.output_order(model, i)
        if self.stack_of(model, i).bare_output:
            return streams[order[0]]
        has_text = self.returns_text(model, i)
        return tuple(
            None if (stream == "text" and not has_text) else streams[stream] for stream in self.output_order(model, i)
        )

    def passthrough(self, model: nn.Module, i: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """What skipped block ``i`` returns: its own stream inputs, in its own output order.

        For SD3's last block this is ``(None, hidden_states)``, exactly like the real block.
        """
        return self.join_outputs(model, i, self.split_inputs(model, i, args, kwargs))

    def text_length(self, model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
        """Text tokens ``N_txt`` of one call of the model's own ``forward`` (the length of its ``model_inputs.text``
        argument ``(B, N_txt, D_text)``), or ``None`` when the call has none."""
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        text = bound.get(self.model_inputs.text)
        return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() >= 2 else None

    def unjoin(
        self, model: nn.Module, i: int, streams: Mapping[str, torch.Tensor | None], text_length: int | None
    ) -> dict[str, torch.Tensor | None]:
        """``streams`` of block ``i`` with a joint ``[text; image]`` sequence (a ``joined_text`` stack) split into
        ``{"text": (B, N_txt, D), "image": (B, N_img, D)}``; other blocks' streams are returned unchanged.

        Raises:
            ConfigError: the block is in a ``joined_text`` stack and the text length is unknown or too long.
        """
        if not self.stack_of(model, i).joined_text:
            return dict(streams)
        joint = streams["image"]
        if joint is None:
            return dict(streams)
        if text_length is None or not 0 <= text_length <= joint.shape[1]:
            raise ConfigError(
                f"Cannot split block {i}'s joint [text; image] sequence",
                expected=f"the model input's text length, at most {joint.shape[1]} tokens",
                found=repr(text_length),
                fix=f"call the model with `{self.model_inputs.text}` (B, N_txt, D_text)",
            )
        return {"text": joint[:, :text_length], "image": joint[:, text_length:]}

    # --------------------------------------------------------------------------------------------- width targets
    def width_targets(self, model: nn.Module, i: int) -> WidthTargets:
        """The width targets that exist on block ``i`` (optional ones it lacks are removed)."""
        targets = self.stack_of(model, i).width
        block = self.block(model, i)
        present = {name for name in targets.names() if _has_submodule(block, name, optional=name in targets.optional)}
        return replace(
            targets,
            text=tuple(n for n in targets.text if n in present),
            text_kv=tuple(n for n in targets.text_kv if n in present),
            ffn=tuple((s, n) for s, n in targets.ffn if n in present),
            modulation=tuple((s, n) for s, n in targets.modulation if n in present),
            ffn_input=tuple((s, n) for s, n in targets.ffn_input if n in present),
        )

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self, model: nn.Module) -> None:
        """Check that ``model`` really has the structure this spec describes (guards against diffusers drift).

        Raises:
            UnsupportedModelError: a block list, block class or block ``forward`` signature differs.
        """
        for stack, blocks in zip(self.stacks, self.stack_lists(model), strict=True):
            for block in blocks[:1]:
                if type(block).__name__ != stack.block_class_name:
                    raise UnsupportedModelError(
                        f"`{stack.attr}` holds unexpected blocks",
                        expected=stack.block_class_name,
                        found=type(block).__name__,
                        fix="use a diffusers version this ppcl release supports",
                    )
                params = tuple(inspect.signature(type(block).forward).parameters)[1:]
                if params != stack.input_names:
                    raise UnsupportedModelError(
                        f"{stack.block_class_name}.forward has an unexpected signature",
                        expected=", ".join(stack.input_names),
                        found=", ".join(params),
                        fix="use a diffusers version this ppcl release supports",
                    )

    # ------------------------------------------------------------------------------------------- depth pruning
    def rewrite_config(self, config: Mapping[str, Any], kept: Sequence[int]) -> dict[str, Any]:
        """The config of the model that keeps only flat blocks ``kept`` (indices into ``config``'s model).

        Block counts per stack and index lists (SD3.5 ``dual_attention_layers``) are rewritten; everything else is
        copied. Raises :class:`~ppcl.errors.ConfigError` for invalid ``kept`` (see :func:`check_kept`).
        """
        return pruning.rewrite_config(self, config, kept)

    def kept_state_dict(
        self, model: nn.Module, kept: Sequence[int], state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``model``'s state dict (or ``state_dict``) without removed blocks, block keys renumbered.

        ``transformer_blocks.7.x`` becomes ``transformer_blocks.3.x`` when block 7 is the 4th kept block of its stack,
        so ``type(model).from_config(spec.rewrite_config(model.config, kept))`` loads it with ``strict=True``.
        """
        return pruning.kept_state_dict(self, model, kept, state_dict)

    def check_kept(self, sizes: Sequence[int], kept: Sequence[int]) -> list[list[int]]:
        """Validate ``kept`` for stacks of ``sizes``; return the kept local indices per stack."""
        return pruning.check_kept(self, sizes, kept)

    def check_pruned_compatible(self, model: nn.Module, kept: Sequence[int]) -> None:
        """Check that the blocks ``kept`` from ``model`` have exactly the parameters the rewritten config builds.

        Builds the pruned model on the meta device (no memory) and compares parameter names and shapes block by
        block, so a mismatch is reported by block index before any weights are copied.
        """
        pruning.check_pruned_compatible(self, model, kept)


def _locate(sizes: Sequence[int], i: int) -> tuple[int, int]:
    total = sum(sizes)
    if not -total <= i < total:
        raise ConfigError(
            f"Block index {i} is out of range",
            expected=f"an index in [0, {total})",
            found=str(i),
        )
    i %= total
    for stack_index, size in enumerate(sizes):
        if i < size:
            return stack_index, i
        i -= size
    raise AssertionError("unreachable: index checked against the total")


def _has_submodule(block: nn.Module, dotted: str, *, optional: bool) -> bool:
    obj: Any = block
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if isinstance(obj, nn.Module):
        return True
    if optional:
        return False
    raise UnsupportedModelError(
        f"{type(block).__name__} has no submodule `{dotted}`",
        expected=f"`{dotted}` to be an nn.Module",
        found=type(obj).__name__,
        fix="use a diffusers version this ppcl release supports",
    )
