"""What one frozen teacher pass records for a width level (METHOD.md Stage 2), for the least-squares init and for
:class:`~ppcl.distill.width.WidthStep`: the calls and outputs of the level's width positions and the projections'
input tensors ``z_i`` and ``g`` (see :mod:`ppcl.distill.width` for their definitions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ppcl.addon import student_key
from ppcl.arch import get_spec
from ppcl.data.recorder import ActivationRecorder, BlockCall
from ppcl.distill.depth import _raise_done, _TeacherDone, _text_mask
from ppcl.errors import ConfigError
from ppcl.kinds import kind_of
from ppcl.modules.width import WidthMode
from ppcl.plan import PruningPlan
from ppcl.runtime import STATE_ATTR, disabled
from ppcl.runtime.width import level_modes

if TYPE_CHECKING:
    from ppcl.plan import TextRun


@dataclass(frozen=True)
class Position:
    """One width-relevant block position of a level.

    Attributes:
        index: flat block index.
        mode: its width mode at the level.
        student: key of the depth student occupying it (an active span starts here), else ``None``.
        last: flat block whose teacher output the position reproduces (``span.stop - 1`` for a student, else itself).
        run: the text run it belongs to (anchor, pruned or last), if any.
    """

    index: int
    mode: WidthMode
    student: str | None
    last: int
    run: TextRun | None

    @property
    def trained(self) -> bool:
        """Whether the position holds a projection (text-pruned, or an FFN replaced)."""
        return self.mode.text in ("pruned", "last") or bool(self.mode.ffn)


@dataclass
class Capture:
    """The teacher tensors of one batch: block calls/outputs, ``z`` per position, ``g`` per (position, stream)."""

    calls: dict[int, BlockCall]
    z: dict[int, Tensor] = field(default_factory=dict)
    g: dict[tuple[int, str], Tensor] = field(default_factory=dict)


def width_positions(plan: PruningPlan, level: str) -> list[Position]:
    """The level's width positions (anchors included), in block order.

    Raises: ConfigError: the level has no width replacement.
    """
    reps = plan.replacements_of(level)
    if not any(kind_of(r).is_width for r in reps):
        raise ConfigError(
            f"level {level!r} has nothing to width-distill",
            expected="a text run or an FFN block",
            found=str([r.id for r in reps]),
            fix="pick a level with width replacements",
        )
    spans = {r.span.start: r for r in reps if kind_of(r).owns_student}
    runs = {i: r for r in reps if kind_of(r).name == "text_run" for i in (r.anchor, *r.pruned_blocks())}
    out = []
    for i, mode in level_modes(plan, reps).items():
        span = spans.get(i)
        out.append(
            Position(
                i,
                mode,
                None if span is None else student_key(span.id),
                i if span is None else span.span.stop - 1,
                runs.get(i),
            )
        )
    return out


def _pre_hook(store: dict[Any, Tensor], key: Any) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        store[key] = args[0].detach()

    return hook


class TeacherCapture:
    """Records what a level's width positions need from ONE frozen teacher pass (add-on disabled, no grad).

    Args: ``model`` (add-on applied or not); ``students``: the add-on's ModuleDict (a depth student occupying a
    position is run on the teacher's input of it); ``positions``: :func:`width_positions` of the level;
    ``early_stop``: end the teacher pass after the last block needed.
    """

    def __init__(
        self, model: nn.Module, students: nn.ModuleDict, positions: list[Position], early_stop: bool = True
    ) -> None:
        self.model, self.spec, self.students, self.positions = model, get_spec(model), students, positions
        self.early_stop = early_stop
        anchors = {p.run.anchor for p in positions if p.run is not None}
        self.by_index = {p.index: p for p in positions}
        self.z_at = sorted(anchors | {p.index for p in positions if p.mode.text in ("pruned", "last")})
        self.needed = sorted({p.index for p in positions} | {p.last for p in positions})

    def occupant(self, i: int) -> nn.Module:
        """The module running at position ``i`` (its depth student, or the teacher block)."""
        pos = self.by_index.get(i)
        return self.spec.block(self.model, i) if pos is None or pos.student is None else self.students[pos.student]

    def _hooks(self, module: nn.Module, i: int, cap: Capture) -> list[RemovableHandle]:
        handles = []
        if i in self.z_at:
            handles.append(module.get_submodule("attn.add_k_proj").register_forward_pre_hook(_pre_hook(cap.z, i)))
        pos = self.by_index.get(i)
        if pos is not None and pos.mode.ffn:
            names = dict(self.spec.width_targets(self.model, i).ffn_input)
            for stream in sorted(pos.mode.ffn):
                norm = module.get_submodule(names[stream])
                handles.append(norm.register_forward_pre_hook(_pre_hook(cap.g, (i, stream))))
        return handles

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> Capture:
        """The teacher tensors of ``batch`` (the transformer's keyword arguments)."""
        model, spec = self.model, self.spec
        cap = Capture({})
        teacher_hooked = [i for i in sorted(set(self.z_at) | set(self.by_index)) if self._on_teacher(i)]
        handles = [h for i in teacher_hooked for h in self._hooks(spec.block(model, i), i, cap)]
        applied = getattr(model, STATE_ATTR, None) is not None
        try:
            with (
                disabled(model) if applied else nullcontext(),
                ActivationRecorder(model, self.needed, spec=spec) as rec,
            ):
                if self.early_stop:
                    # Registered after the recorder's hooks, so the last block's output is recorded before we stop.
                    handles.append(spec.block(model, self.needed[-1]).register_forward_hook(_raise_done))
                try:
                    model(**batch, return_dict=False)
                except _TeacherDone:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        for i in self.needed:
            if len(rec[i]) != 1:
                raise ConfigError(
                    f"block {i} ran {len(rec[i])} times in one teacher forward",
                    expected="each block called once per forward",
                    found=f"{len(rec[i])} calls",
                    fix="distill the bare transformer, not a wrapper that loops over its blocks",
                )
            cap.calls[i] = rec[i][0]
        for i in [i for i in sorted(set(self.z_at) | set(self.by_index)) if not self._on_teacher(i)]:
            handles = self._hooks(self.occupant(i), i, cap)  # a depth student: run it (stock) on the teacher's input
            try:
                self.occupant(i)(*cap.calls[i].args, **cap.calls[i].kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        missing = [i for i in self.z_at if i not in cap.z]
        if missing:
            raise ConfigError(
                "the text key projection was never called",
                expected="attn.add_k_proj to run on the modulated text features",
                found=f"no call at blocks {missing}",
                fix="unfuse fused QKV projections (transformer.unfuse_qkv_projections())",
            )
        return cap

    def _on_teacher(self, i: int) -> bool:
        pos = self.by_index.get(i)
        return pos is None or pos.student is None

    def output(self, cap: Capture, i: int, stream: str) -> Tensor | None:
        """The teacher's ``stream`` output of position ``i`` (of its span's last block for a student)."""
        last = self.by_index[i].last if i in self.by_index else i
        return self.spec.split_outputs(self.model, last, cap.calls[last].output).get(stream)

    def pairs(
        self, cap: Capture, plan: PruningPlan, level: str
    ) -> Iterator[tuple[str, Tensor, Tensor | None, Tensor | None]]:
        """``(projection key, input, teacher target, text mask or None)`` for every projection of the level."""
        view = _CaptureView(self, cap)
        for rep in plan.replacements_of(level):
            yield from kind_of(rep).projection_targets(rep, view)


class _CaptureView:
    """One captured teacher pass as a :class:`~ppcl.kinds.base.TargetView` for the kinds' projection targets."""

    def __init__(self, capture: TeacherCapture, cap: Capture) -> None:
        self.capture, self.cap = capture, cap

    def z(self, i: int) -> Tensor:
        return self.cap.z[i]

    def g(self, i: int, stream: str) -> Tensor:
        return self.cap.g[(i, stream)]

    def output(self, i: int, stream: str) -> Tensor | None:
        return self.capture.output(self.cap, i, stream)

    def text_mask(self, i: int) -> Tensor | None:
        return _text_mask(self.capture.spec, self.capture.model, i, self.cap.calls[i])
