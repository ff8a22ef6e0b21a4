"""The drop kind: blocks removed outright, with no student (the untrained baseline every layer-skipping method starts
from, e.g. SD3's ``skip_layers``).

Its whole life is in this file, as a new kind's should be: the plan value object :class:`DropSpan` (JSON, validation,
conflicts, parameter count; registered with the plan's JSON registry) and its behaviour :class:`DropKind` (no add-on
module; every block of the span passes its inputs on). Everything else is generic: a level's merged model drops the
span's blocks because :meth:`DropSpan.removed_blocks` says so, the add-on holds nothing for it, and distillation has
nothing to train (a level mixing drops and depth spans trains its students with the drops active in sequential mode;
chain-aware inputs treat dropped blocks as kept teacher blocks, like width replacements).

Use it to measure what a span costs before paying for distillation (``ppcl eval`` a level of drops), or to ship a
zero-training level next to distilled ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ppcl.errors import ConfigError
from ppcl.kinds.base import Kind, register_kind
from ppcl.plan import BlockLayout, Issue, Replacement, Span, _json, register_replacement

if TYPE_CHECKING:
    from ppcl.plan.count import ParamTable


@register_replacement
@dataclass(frozen=True)
class DropSpan(Replacement):
    """The blocks of ``span`` are removed with nothing in their place.

    Attributes:
        span: flat half-open range of the dropped blocks, inside one stack, at least one block.
        id: stable name; defaults to ``"drop:<start>-<stop>"`` (half-open flat bounds).
    """

    kind: ClassVar[str] = "drop"

    span: Span
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.span, Span):
            raise _not_a_span(self.span)
        if not self.id:
            object.__setattr__(self, "id", f"drop:{self.span.start}-{self.span.stop}")

    def blocks(self) -> tuple[int, ...]:
        return tuple(self.span.blocks)

    def removed_blocks(self) -> tuple[int, ...]:
        return tuple(self.span.blocks)

    def removed_params(self, table: ParamTable) -> int:
        return sum(table.per_block[i] for i in self.span.blocks)

    def conflicts_with(self, other: Replacement) -> bool:
        # A dropped block cannot also hold a student or a width change, whatever the other kind.
        return bool(set(self.blocks()) & set(other.blocks()))

    def issues(self, layout: BlockLayout) -> list[Issue]:
        found = layout.describe_both(self.span)
        if self.span.stop > layout.total:
            fix = "shorten the span or check that the plan was made for this model"
            return [Issue("runs past the last block", f"a span inside flat blocks [0, {layout.total})", found, fix)]
        issues = []
        if len(layout.stacks_of(self.span)) > 1:
            issues.append(
                Issue(
                    "crosses a block-stack boundary",
                    "a span inside one stack",
                    found,
                    "split it at the stack boundary into one drop per stack",
                )
            )
        hit = sorted(layout.protected.intersection(self.span.blocks))
        if hit:
            issues.append(
                Issue(
                    f"covers protected block(s) {hit}",
                    f"a span avoiding the protected blocks {sorted(layout.protected)}",
                    found,
                    "shrink the span, or lower the plan's protect_first / protect_last",
                )
            )
        return issues

    def describe(self, layout: BlockLayout | None = None) -> str:
        where = layout.describe_both(self.span) if layout is not None else f"{self.span} = {self.span.paper()}"
        return f"{self.id}: {where} dropped (no student), removes {self.span.size}"

    def fields_json(self) -> dict[str, Any]:
        u, v = self.span.inclusive
        return {"start": self.span.start, "stop": self.span.stop, "inclusive": [u, v]}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], replacement_id: str | None, where: str) -> DropSpan:
        span = Span(_json.require(data, "start", int, where), _json.require(data, "stop", int, where))
        inclusive = _json.optional(data, "inclusive", list, where, [])
        if inclusive and inclusive != list(span.inclusive):
            # Both forms are written for readability; a hand edit of only one must not pass silently.
            raise ConfigError(
                f"Plan fields `{where}.start/stop` and `{where}.inclusive` disagree",
                expected=f"inclusive [start, stop - 1] = {list(span.inclusive)}",
                found=f"inclusive {inclusive}",
                fix="edit both, or delete `inclusive`",
            )
        return cls(span, replacement_id or "")


class DropKind(Kind):
    """``drop``: no add-on module; every block of the span is skipped at run time."""

    name = "drop"

    def module_keys(self, rep: Replacement) -> list[str]:
        return []

    def label(self, rep: Replacement) -> str:
        return f"{rep.id} (dropped)"

    def add_dispatch(
        self, rep: Replacement, students: Mapping[str, nn.Module], table: dict[int, object], skip: object
    ) -> None:
        table.update(dict.fromkeys(rep.blocks(), skip))


def _not_a_span(value: object) -> ConfigError:
    return ConfigError(
        "A drop replacement needs a Span",
        expected="a ppcl.plan.Span",
        found=type(value).__name__,
        fix="use DropSpan(Span(start, stop))",
    )


DROP = register_kind(DropKind())
