"""Data echoing: one frozen teacher pass serves several optimiser steps (``DistillConfig.teacher_reuse``).

Why: in depth distillation the frozen teacher's forward is most of a step (about half on the toy demo's depth stage,
``teacher_forward_ratio`` in the add-on's provenance; at real size the teacher runs every block while only a few
students train). With ``teacher_reuse = k`` the trainer draws a new batch every ``k`` steps (the data index is
``step // k``) and the step module keeps that batch's teacher records, so ``k`` steps cost one teacher pass. The echoes
are not repeats of one gradient step: the students have moved, and whatever a step draws from its own index (the
chain-mix rows, a fine-tune's level) is drawn again. This is "data echoing" (Choi et al., 2019, arXiv 1907.05550).

A resumed run starts with an empty cache and recomputes the pass from the same batch, so resume stays exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TeacherEcho(Generic[T]):
    """The teacher results of the last ``capacity`` batches, keyed by their data index.

    ``capacity`` is the number of micro-batches in one optimiser step (the gradient accumulation): an echoed step
    meets the same micro-batches again. ``capacity = 0`` (no echoing) keeps nothing, so a run without echoing holds no
    teacher tensors past their step.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[int, T] = OrderedDict()
        self.hits = 0

    def get(self, key: int | None, compute: Callable[[], T]) -> T:
        """The result kept for ``key``, else ``compute()`` (kept when ``key`` is not None and capacity allows)."""
        if key is not None and key in self._kept:
            self.hits += 1
            self._kept.move_to_end(key)
            return self._kept[key]
        value = compute()
        if key is not None and self.capacity > 0:
            self._kept[key] = value
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every kept result (the end of a run: their tensors are freed)."""
        self._kept.clear()


NO_ECHO: TeacherEcho = TeacherEcho(0)
"""The default of step modules used outside a training session: keeps nothing (safe to share)."""
