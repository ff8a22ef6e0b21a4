"""The FFN-to-linear kind: a block's feed-forward half replaced by one residual linear map per stream (METHOD.md stage
2, FFNs). Keys ``ffn_<block>__image`` / ``ffn_<block>__text``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ppcl.errors import ConfigError
from ppcl.kinds.base import register_kind
from ppcl.kinds.projections import ProjectionKind, width_key
from ppcl.kinds.text_run import _get

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.kinds.base import TargetView
    from ppcl.modules.width import WidthParts
    from ppcl.plan import FFNLinear, Replacement


class FFNLinearKind(ProjectionKind):
    """``ffn_linear``: one map per replaced stream of one block."""

    name = "ffn_linear"

    def label(self, rep: Replacement) -> str:
        """E.g. ``"ffn:2 (FFN → linear at flat block 2, streams image+text)"``."""
        one: FFNLinear = rep  # type: ignore[assignment]
        return f"{one.id} (FFN → linear at flat block {one.block}, streams {'+'.join(one.streams)})"

    def module_keys(self, rep: Replacement) -> list[str]:
        """One key per stream."""
        ffn: FFNLinear = rep  # type: ignore[assignment]
        return [width_key(ffn, s) for s in ffn.streams]

    def check_support(self, spec: ArchSpec, model: nn.Module, rep: Replacement) -> None:
        """A supported block class that has a separate FFN for every replaced stream."""
        super().check_support(spec, model, rep)
        ffn: FFNLinear = rep  # type: ignore[assignment]
        targets = spec.width_targets(model, ffn.block)
        missing = [s for s in ffn.streams if targets.ffn_of(s) is None]
        if missing:
            raise ConfigError(
                f"Replacement {ffn.id} replaces the FFN of stream(s) {missing}, which block {ffn.block} does not have",
                expected=f"streams among {[s for s, _ in targets.ffn]}",
                found=str(list(ffn.streams)),
                fix="drop those streams (e.g. SD3's last block has no text FFN)",
            )

    def add_width_modes(self, rep: Replacement, text: dict[int, tuple[str, str]], ffn: dict[int, set[str]]) -> None:
        """The block's replaced streams."""
        one: FFNLinear = rep  # type: ignore[assignment]
        ffn.setdefault(one.block, set()).update(one.streams)

    def add_width_parts(
        self,
        rep: Replacement,
        students: Mapping[str, nn.Module],
        index: int,
        run: str | None,
        text_role: str,
        parts: WidthParts,
    ) -> None:
        """This block's maps, by stream."""
        one: FFNLinear = rep  # type: ignore[assignment]
        if one.block == index:
            parts.ffn.update({s: _get(students, width_key(one, s)) for s in one.streams})

    def projection_targets(
        self, rep: Replacement, view: TargetView
    ) -> Iterator[tuple[str, Tensor, Tensor | None, Tensor | None]]:
        """Per stream: the FFN half's input ``g`` → the block's (or its span's) output of that stream."""
        one: FFNLinear = rep  # type: ignore[assignment]
        mask = view.text_mask(one.block)
        for s in one.streams:
            yield width_key(one, s), view.g(one.block, s), view.output(one.block, s), mask if s == "text" else None


FFN_LINEAR = register_kind(FFNLinearKind())
