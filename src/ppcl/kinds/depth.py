"""The depth kind: a contiguous span of blocks replaced by one student block (METHOD.md stage 1).

Its one module is the student, under :func:`~ppcl.kinds.base.student_key` of the replacement id; the add-on builds it
from the teacher's blocks (its ``init``), so there is nothing to build fresh here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from ppcl.kinds.base import Kind, register_kind, student_key

if TYPE_CHECKING:
    from ppcl.plan import Replacement


class DepthKind(Kind):
    """``depth``: a span ``[start, stop)`` run by one student; the other blocks of the span pass their inputs on."""

    name = "depth"
    owns_student = True

    def module_keys(self, rep: Replacement) -> list[str]:
        """The student's key."""
        return [student_key(rep.id)]

    def add_dispatch(
        self, rep: Replacement, students: Mapping[str, nn.Module], table: dict[int, object], skip: object
    ) -> None:
        """The span's first block runs the student; the others are skipped."""
        span = rep.span  # type: ignore[attr-defined]
        table[span.start] = students[student_key(rep.id)]
        table.update(dict.fromkeys(range(span.start + 1, span.stop), skip))


DEPTH = register_kind(DepthKind())
