"""Runtime side of width replacements: projection keys, fresh projections, and the per-level width actions.

The add-on holds every projection in its ``students`` ``nn.ModuleDict`` under its own key (:func:`width_key`):

* text run ``text:50-60``: ``text_50_60__in_<j>`` (``L_j``, one per text-pruned flat block ``j``) and
  ``text_50_60__out`` (``L_h``);
* FFN block ``ffn:2``: ``ffn_2__image`` and/or ``ffn_2__text``.

A level's width action at flat block ``i`` runs :func:`ppcl.modules.width.width_forward` on the module that occupies
``i`` at that level: the teacher block, or the depth student when ``i`` starts an active span (students inside a text
run are text-pruned like any block).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ppcl.arch import ArchSpec, get_spec
from ppcl.kinds import block_dim, kind_of, width_key
from ppcl.modules.width import RunContext, WidthMode, WidthParts, run_width
from ppcl.plan import PruningPlan, Replacement, check_level_width

__all__ = [
    "WidthAction",
    "block_dim",
    "check_width_support",
    "level_modes",
    "like_input",
    "parts_for",
    "projection_keys",
    "width_actions",
    "width_key",
    "width_modules",
]


def projection_keys(rep: Replacement) -> list[str]:
    """Every projection key ``rep`` needs (empty for kinds without projections)."""
    kind = kind_of(rep)
    return kind.module_keys(rep) if kind.is_width else []


def width_modules(model: nn.Module, plan: PruningPlan, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Fresh identity projections (``W = 0, b = 0``) for every width replacement of ``plan``, on the blocks' device."""
    spec = get_spec(model)
    return {
        key: module
        for rep in plan.replacements
        for key, module in kind_of(rep).fresh_modules(model, spec, rep, dtype).items()
    }


def check_width_support(spec: ArchSpec, model: nn.Module, plan: PruningPlan) -> None:
    """Raise :class:`ConfigError` if a replacement targets a block that cannot run it (each kind checks its own)."""
    for rep in plan.replacements:
        kind_of(rep).check_support(spec, model, rep)


class WidthAction:
    """Dispatch action of a width-modified block position at one level.

    Attributes:
        module: the module occupying the position (a depth student), or ``None`` for the dispatched block itself.
        mode, parts, ctx: see :func:`ppcl.modules.width.width_forward`.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        index: int,
        module: nn.Module | None,
        mode: WidthMode,
        parts: WidthParts,
        ctx: RunContext | None,
    ) -> None:
        self.model, self.spec, self.index, self.module = model, spec, index, module
        self.mode, self.parts, self.ctx = mode, parts, ctx

    def __call__(
        self,
        block: nn.Module,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        compile_options: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> tuple[Any, ...]:
        """The position's output; ``compile_options``: those of the dispatched block's regional compilation
        (:func:`~ppcl.modules.width.run_width`)."""
        bound = self.spec.bind_call(self.model, self.index, args, kwargs)
        module = self.module if self.module is not None else block
        text, image = run_width(module, bound, self.mode, self.parts, self.ctx, compile_options)
        names = dict(self.spec.stack_of(self.model, self.index).stream_inputs)
        streams = {
            "text": like_input(text, bound.get(names["text"])),
            "image": like_input(image, bound.get(names["image"])),
        }
        return self.spec.join_outputs(self.model, self.index, streams)

    def __repr__(self) -> str:
        return f"WidthAction(block {self.index}, text={self.mode.text}, ffn={sorted(self.mode.ffn)})"


def like_input(output: Any, given: Any) -> Any:
    """``output`` in the dtype of the stream tensor the block was ``given`` (unchanged when either is not a floating
    tensor, or they already agree).

    While a float32 student (master weights, :mod:`ppcl.distill.precision`) trains inside a bf16 model under autocast,
    its elementwise ops may promote a stream to float32; the next block must still get the base dtype, as it does at
    inference when the student is back in that dtype. A no-op whenever the dtypes match (every float32 model).
    """
    if (
        isinstance(output, Tensor)
        and isinstance(given, Tensor)
        and output.is_floating_point()
        and given.is_floating_point()
        and output.dtype != given.dtype
    ):
        return output.to(given.dtype)
    return output


def level_modes(plan: PruningPlan, reps: Sequence[Replacement]) -> dict[int, WidthMode]:
    """Flat index → width mode for the active replacements ``reps`` of one level (positions left out run stock)."""
    text: dict[int, tuple[str, str]] = {}
    ffn: dict[int, set[str]] = {}
    for rep in reps:
        kind_of(rep).add_width_modes(rep, text, ffn)
    return {
        i: WidthMode(
            text.get(i, ("full", None))[0],
            frozenset(ffn.get(i, ())),  # type: ignore[arg-type]
            text.get(i, ("full", None))[1],
        )
        for i in sorted(text.keys() | ffn.keys())
    }


def parts_for(
    students: Mapping[str, nn.Module], plan: PruningPlan, reps: Sequence[Replacement], index: int, mode: WidthMode
) -> WidthParts:
    """The projections block ``index`` uses in ``mode``, looked up in ``students`` (the add-on's ModuleDict)."""
    parts = WidthParts()
    for rep in reps:
        kind_of(rep).add_width_parts(rep, students, index, mode.run, mode.text, parts)
    return parts


def width_actions(
    model: nn.Module,
    spec: ArchSpec,
    plan: PruningPlan,
    level: str,
    students: Mapping[str, nn.Module],
    depth_table: Mapping[int, Any],
    contexts: dict[str, RunContext],
) -> dict[int, WidthAction]:
    """Width actions of ``level``; a position that starts an active depth span runs its student in width mode."""
    reps = plan.replacements_of(level)
    if not any(kind_of(r).is_width for r in reps):
        return {}
    check_level_width(plan, level)
    actions = {}
    for i, mode in level_modes(plan, reps).items():
        occupant = depth_table.get(i)
        module = occupant if isinstance(occupant, nn.Module) else None
        ctx = contexts.setdefault(mode.run, RunContext()) if mode.run is not None else None
        actions[i] = WidthAction(model, spec, i, module, mode, parts_for(students, plan, reps, i, mode), ctx)
    return actions
