"""The base of a replacement kind's behaviour outside the plan, and the registry the add-on and runtime loop over.

A plan's replacement value objects (:mod:`ppcl.plan.replacements`) say *what* is replaced; a :class:`Kind` says what
ppcl does about it: which add-on modules it owns and under which keys, how fresh ones are built, whether a block can
hold it, and how it shapes a level's width modes at run time. One subclass per kind, registered under the plan's JSON
tag (``Replacement.kind``), as peft has one tuner class per adapter type: the add-on and the runtime call
:func:`kind_of` and never switch on concrete replacement classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ppcl.errors import ConfigError

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.modules.width import WidthParts
    from ppcl.plan import Replacement

_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


def student_key(replacement_id: str) -> str:
    """``nn.ModuleDict``-safe key of a replacement's module(s): ``"depth:3-5"`` → ``"depth_3_5"``."""
    return _UNSAFE.sub("_", replacement_id)


class Kind:
    """What ppcl does with one replacement kind; subclasses override what their kind needs.

    Attributes:
        name: the plan JSON tag this class handles (``Replacement.kind``).
        is_width: the kind's modules are residual linear projections (width pruning) rather than a student block.
        owns_student: the kind's one module is a student block standing in for teacher blocks (depth).
    """

    name: ClassVar[str] = ""
    is_width: ClassVar[bool] = False
    owns_student: ClassVar[bool] = False

    def label(self, rep: Replacement) -> str:
        """Short human label of ``rep`` for cards and logs (its id by default)."""
        return rep.id

    def module_keys(self, rep: Replacement) -> list[str]:
        """Keys of the add-on modules ``rep`` owns, in the add-on's ``students`` ``nn.ModuleDict``."""
        raise NotImplementedError

    def fresh_modules(
        self, model: nn.Module, spec: ArchSpec, rep: Replacement, dtype: torch.dtype = torch.float32
    ) -> dict[str, nn.Module]:
        """New, untrained modules for ``rep`` by key; empty when the add-on builds them itself (depth students are
        copied from teacher blocks by :class:`~ppcl.addon.PruningAddon`)."""
        return {}

    def check_support(self, spec: ArchSpec, model: nn.Module, rep: Replacement) -> None:
        """Raise :class:`ConfigError` when ``model``'s blocks cannot run ``rep`` (nothing to check by default)."""

    def add_dispatch(
        self, rep: Replacement, students: Mapping[str, nn.Module], table: dict[int, object], skip: object
    ) -> None:
        """Add ``rep``'s entries to one level's dispatch table (flat block → the module that runs there, or ``skip``
        for a block that passes its inputs on). Width kinds add theirs later, as width actions."""

    def projection_targets(
        self, rep: Replacement, view: TargetView
    ) -> Iterator[tuple[str, Tensor, Tensor | None, Tensor | None]]:
        """``(module key, input, teacher target, text mask or None)`` for each of ``rep``'s projections, from one
        captured teacher pass (what least-squares initialisation and width distillation fit); none by default."""
        return iter(())

    def add_width_modes(self, rep: Replacement, text: dict[int, tuple[str, str]], ffn: dict[int, set[str]]) -> None:
        """Add ``rep``'s per-block width roles to one level's ``text`` (block → (role, run id)) and ``ffn``
        (block → streams) tables; kinds that do not change block width add nothing."""

    def add_width_parts(
        self,
        rep: Replacement,
        students: Mapping[str, nn.Module],
        index: int,
        run: str | None,
        text_role: str,
        parts: WidthParts,
    ) -> None:
        """Put the projections block ``index`` takes from ``rep`` into ``parts`` (nothing by default)."""


class TargetView(Protocol):
    """What a kind reads from one captured teacher pass (:class:`ppcl.distill.width_capture.TeacherCapture`)."""

    def z(self, i: int) -> Tensor:
        """Modulated text features ``(B, N_txt, D)`` at block ``i``'s text key projection."""
        ...

    def g(self, i: int, stream: str) -> Tensor:
        """``stream``'s hidden state ``(B, N, D)`` entering block ``i``'s second half (the FFN norm's input)."""
        ...

    def output(self, i: int, stream: str) -> Tensor | None:
        """The teacher's ``stream`` output of position ``i`` (of its span's last block when a student sits there)."""
        ...

    def text_mask(self, i: int) -> Tensor | None:
        """The text padding mask ``(B, N_txt)`` block ``i`` was called with, if any."""
        ...


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Register ``kind`` under ``kind.name`` (one per plan JSON tag); returns it."""
    if not kind.name or kind.name in _KINDS:
        raise ValueError(f"kind {kind.name!r} is empty or registered twice")
    _KINDS[kind.name] = kind
    return kind


def kind_of(rep: Replacement) -> Kind:
    """The registered behaviour of ``rep``'s kind.

    Raises:
        ConfigError: no kind is registered under ``rep.kind`` (a plan from a newer ppcl, or a kind added to plans
            without its module in :mod:`ppcl.kinds`).
    """
    kind = _KINDS.get(rep.kind)
    if kind is None:
        raise ConfigError(
            f"replacement {rep.id} has a kind this ppcl cannot run: {rep.kind!r}",
            expected=f"one of {sorted(_KINDS)}",
            found=repr(rep.kind),
            fix="remove those replacements from the plan, or use a ppcl version that supports them",
        )
    return kind


def check_kinds(reps: Iterable[Replacement]) -> list[Replacement]:
    """``reps`` as a list, after checking every kind is registered (the first unknown one raises)."""
    out = list(reps)
    for rep in out:
        kind_of(rep)
    return out


def registered_kinds() -> list[str]:
    """The plan JSON tags ppcl can run, sorted."""
    return sorted(_KINDS)
