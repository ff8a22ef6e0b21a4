"""The text-run kind: a run of blocks whose text stream is pruned (METHOD.md stage 2, text stream).

The anchor block keeps its text stream and hands ``z_a`` on; each later block ``j`` of the run reads its text keys and
values from ``L_j(z_a)`` (key ``text_<run>__in_<j>``), and the last one returns ``L_h(z_a)`` as the text stream (key
``text_<run>__out``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ppcl.kinds.base import register_kind
from ppcl.kinds.projections import ProjectionKind, width_key

if TYPE_CHECKING:
    from ppcl.kinds.base import TargetView
    from ppcl.modules.width import WidthParts
    from ppcl.plan import Replacement, TextRun


class TextRunKind(ProjectionKind):
    """``text_run``: one ``L_j`` per text-pruned block and one ``L_h`` for the run's output."""

    name = "text_run"

    def label(self, rep: Replacement) -> str:
        """E.g. ``"text:50-60 (text run, inclusive [50, 59])"``."""
        run: TextRun = rep  # type: ignore[assignment]
        a, b = run.run.inclusive
        skip = f", skipping {list(run.skip)}" if run.skip else ""
        return f"{run.id} (text run, inclusive [{a}, {b}]{skip})"

    def module_keys(self, rep: Replacement) -> list[str]:
        """``in_<j>`` for every pruned block ``j``, then ``out``."""
        run: TextRun = rep  # type: ignore[assignment]
        return [width_key(run, f"in_{j}") for j in run.pruned_blocks()] + [width_key(run, "out")]

    def add_width_modes(self, rep: Replacement, text: dict[int, tuple[str, str]], ffn: dict[int, set[str]]) -> None:
        """The anchor, then ``pruned`` blocks and the ``last`` one."""
        run: TextRun = rep  # type: ignore[assignment]
        text[run.anchor] = ("anchor", run.id)
        for j in run.pruned_blocks():
            text[j] = ("last" if j == run.last else "pruned", run.id)

    def add_width_parts(
        self,
        rep: Replacement,
        students: Mapping[str, nn.Module],
        index: int,
        run: str | None,
        text_role: str,
        parts: WidthParts,
    ) -> None:
        """``L_j`` for a pruned block of this run, and ``L_h`` too for its last block."""
        if rep.id != run or text_role not in ("pruned", "last"):
            return
        parts.text_in = _get(students, width_key(rep, f"in_{index}"))
        if text_role == "last":
            parts.text_out = _get(students, width_key(rep, "out"))

    def projection_targets(
        self, rep: Replacement, view: TargetView
    ) -> Iterator[tuple[str, Tensor, Tensor | None, Tensor | None]]:
        """``L_j``: ``z_a`` → ``z_j`` for every pruned block ``j``; ``L_h``: the anchor's text output → the run's last
        block's text output."""
        run: TextRun = rep  # type: ignore[assignment]
        a = run.anchor
        mask = view.text_mask(a)
        for j in run.pruned_blocks():
            yield width_key(run, f"in_{j}"), view.z(a), view.z(j), mask
        h_a = view.output(a, "text")
        assert h_a is not None  # an anchor is followed by run blocks, so it returns text
        yield width_key(run, "out"), h_a, view.output(run.last, "text"), mask


def _get(students: Mapping[str, nn.Module], key: str) -> nn.Module:
    from ppcl.errors import ConfigError

    if key not in students:
        raise ConfigError(
            f"The add-on has no projection {key!r}",
            expected="one projection per width target",
            found=f"keys {sorted(students)[:6]}...",
            fix="build the add-on with PruningAddon.from_plan",
        )
    return students[key]


TEXT_RUN = register_kind(TextRunKind())
