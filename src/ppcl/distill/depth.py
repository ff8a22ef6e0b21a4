"""One depth-distillation step for every span at once (METHOD.md stage 1.3).

Non-sequential (the method): ONE frozen teacher forward (add-on disabled, no grad) records, for every span
``[u, v]`` (inclusive), the call of block ``u`` (the teacher's ``x_{u−1}`` plus that step's temb / rotary / mask)
and the output of block ``v`` (the teacher's ``x_v``). Each student is then called with block ``u``'s recorded call
and scored against ``x_v``. A student never sees another student's output, so errors cannot accumulate, and the
spans of a plan may even overlap (they are trained independently).

Sequential (ablation baseline): the pruned model runs end to end with gradients at a level holding every trained
span; forward hooks keep the output of each span's first block (the student's output, since the rest of the span
passes through) and compare it with the teacher's ``x_v``. Later spans' losses reach earlier students through the
activations in between.

:class:`DepthStep` is an ``nn.Module`` whose only submodule is the add-on's ``students`` ModuleDict: handing it to
``accelerate.prepare`` wraps (DDP) or autocasts the students and never the teacher, which stays a plain attribute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppcl.addon import student_key
from ppcl.arch import ArchSpec, get_spec
from ppcl.data.recorder import ActivationRecorder, BlockCall
from ppcl.distill.chain import call_with_streams, chain_blocks, chain_groups, chained_inputs, mix_inputs
from ppcl.distill.echo import NO_ECHO, TeacherEcho
from ppcl.distill.losses import depth_loss
from ppcl.errors import ConfigError
from ppcl.kinds import kind_of
from ppcl.plan import DepthReplacement, PruningPlan
from ppcl.runtime import STATE_ATTR, disabled, set_level

Mode = Literal["nonsequential", "sequential"]
MODES: tuple[str, ...] = get_args(Mode)


class _TeacherDone(Exception):
    """Raised from a forward hook to end the teacher pass once the last needed block has run."""


def depth_replacements(plan: PruningPlan, level: str | None = None) -> list[DepthReplacement]:
    """The depth replacements to train: all of the plan's (``level=None``) or those active at ``level``."""
    reps = plan.replacements if level is None else plan.replacements_of(level)
    out = [rep for rep in reps if kind_of(rep).owns_student]
    if not out:
        raise ConfigError(
            "nothing to distill",
            expected="at least one depth replacement" + ("" if level is None else f" active at level {level!r}"),
            found=f"{len(list(reps))} replacement(s), none of kind depth",
            fix="propose a plan with depth spans, or pick another level",
        )
    return out


def sequential_level(plan: PruningPlan, reps: Sequence[DepthReplacement], level: str | None) -> str:
    """The level the pruned model runs at in sequential mode.

    Every trained span must be active in one pass (otherwise its student never runs). With ``level`` given, ``reps``
    are that level's spans already. Without, the first level (plan order) that holds every span is used: proposed
    plans are nested cheapest-first, so that is their largest level. A plan whose spans never all meet in one level
    (hand-made, overlapping alternatives) has no sequential meaning and raises.
    """
    if level is not None:
        return level
    wanted = {rep.id for rep in reps}
    for lvl in plan.levels:
        if wanted <= {rep.id for rep in plan.replacements_of(lvl.name)}:
            return lvl.name
    raise ConfigError(
        "sequential distillation needs one level holding every span",
        expected=f"a level containing all of {sorted(wanted)}",
        found=f"levels {plan.level_names}, none containing all",
        fix="pass level=NAME to distill that level's spans sequentially, or use mode 'nonsequential'",
    )


def _text_mask(spec: ArchSpec, model: nn.Module, i: int, call: BlockCall) -> torch.Tensor | None:
    name = spec.stack_of(model, i).input_name("text_mask")
    if name is None:
        return None
    mask = spec.bind_call(model, i, call.args, call.kwargs).get(name)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class DepthStep(nn.Module):
    """Per-span depth losses of one batch; the add-on's students are its only parameters.

    Args:
        model: the transformer with the add-on applied (``model.ppcl is students``).
        students: ``addon.students``.
        replacements: the depth spans to train.
        mode: ``"nonsequential"`` (the method) or ``"sequential"`` (ablation baseline).
        level: sequential mode only: the level the pruned model runs at (holding every span). A sequential step
            leaves the model at this level, so that gradient-checkpointed blocks recompute in backward exactly as
            they ran; restore the previous level after training (the trainer does).
        gradient_checkpointing: non-sequential mode: recompute each student in backward
            (``torch.utils.checkpoint``). Sequential mode uses the model's own checkpointing, which the trainer turns
            on with ``model.enable_gradient_checkpointing()``.
        early_stop: end the teacher pass after the last block any span needs instead of running the whole model.
        chain_mix: non-sequential mode: share of each batch's samples on which a student gets its *chained* input
            (the output of the upstream students of the levels that contain it, :mod:`ppcl.distill.chain`) instead
            of the teacher's; 0 is the paper's pure non-sequential distillation.
        plan: the plan whose levels define the chains (needed when ``chain_mix > 0``).
    """

    def __init__(
        self,
        model: nn.Module,
        students: nn.ModuleDict,
        replacements: Sequence[DepthReplacement],
        mode: Mode = "nonsequential",
        level: str | None = None,
        gradient_checkpointing: bool = False,
        early_stop: bool = True,
        chain_mix: float = 0.0,
        plan: PruningPlan | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError("unknown distillation mode", expected=f"one of {MODES}", found=repr(mode))
        if mode == "sequential" and level is None:
            raise ConfigError(
                "sequential mode needs a level",
                expected="a level name holding every span",
                found="None",
                fix="use sequential_level(plan, replacements, None)",
            )
        self.students = students
        # A plain attribute, not a submodule: accelerate must never wrap, cast or broadcast the teacher.
        self.__dict__["model"] = model
        self.spec = get_spec(model)
        self.replacements = list(replacements)
        missing = [rep.id for rep in self.replacements if student_key(rep.id) not in students]
        if missing:
            raise ConfigError(
                "the add-on has no student for some spans",
                expected="one student per depth span",
                found=f"missing {missing}",
                fix="build the add-on from the same plan",
            )
        self.mode = mode
        self.level = level
        self.gradient_checkpointing = gradient_checkpointing
        self.early_stop = early_stop
        if not 0.0 <= chain_mix <= 1.0:
            raise ConfigError(
                "chain mix must be a share of the batch", expected="0 <= chain_mix <= 1", found=str(chain_mix)
            )
        if chain_mix > 0 and (plan is None or mode != "nonsequential"):
            raise ConfigError(
                "chain-aware inputs need the plan, in non-sequential mode",
                expected="plan=... and mode 'nonsequential'",
                found=f"plan={plan is not None}, mode={mode!r}",
                fix="pass the plan, or chain_mix=0",
            )
        self.chain_mix = chain_mix
        self.chains = chain_groups(plan, self.replacements) if chain_mix > 0 and plan is not None else []
        self.timing: dict[str, float] = {}
        """Seconds of the last step's teacher pass and whole forward (set when :attr:`measure` is true)."""
        self.measure = False
        self.micro_index, self.data_index = 0, None  # set by the loop before each call (StepModule)

    model: nn.Module
    echo: TeacherEcho = NO_ECHO  # the trainer sets its own (data echoing)

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        """``{replacement id: scalar loss}`` for ``batch`` (the transformer's keyword arguments)."""
        t0 = self._clock()
        # Echoed steps (DistillConfig.teacher_reuse) meet the same data index and reuse its pass.
        records = self.echo.get(self.data_index, lambda: self.teacher_pass(batch))
        t1 = self._clock()
        if self.mode == "nonsequential":
            losses = self._nonsequential(records, self._chained(records))
        else:
            losses = self._sequential(batch, records)
        if self.measure:
            self.timing = {"teacher_s": t1 - t0, "forward_s": self._clock() - t0}
        return losses

    # ------------------------------------------------------------------------------------------------ teacher
    def teacher_pass(self, batch: dict[str, Any]) -> dict[int, BlockCall]:
        """One frozen teacher forward; the call of each span's first block and the output of its last block.

        Returns ``{flat block index: BlockCall}``; the recorded tensors are detached views of the pass's own tensors
        (nothing is copied).
        """
        model, spec = self.model, self.spec
        needed = sorted(
            {r.span.start for r in self.replacements}
            | {r.span.stop - 1 for r in self.replacements}
            | chain_blocks(model, spec, self.chains)
        )
        # A sharded session runs the bare model (no add-on applied): it is the teacher as it is.
        off = disabled(model) if getattr(model, STATE_ATTR, None) is not None else nullcontext()
        with torch.no_grad(), off, ActivationRecorder(model, needed, spec=spec) as recorder:
            stop = None
            if self.early_stop:
                # Registered after the recorder's hooks, so the last block's output is recorded before we stop.
                stop = spec.block(model, needed[-1]).register_forward_hook(_raise_done)
            try:
                model(**batch, return_dict=False)
            except _TeacherDone:
                pass
            finally:
                if stop is not None:
                    stop.remove()
        out = {}
        for i in needed:
            calls = recorder[i]
            if len(calls) != 1:
                raise ConfigError(
                    f"block {i} ran {len(calls)} times in one teacher forward",
                    expected="each block called once per forward",
                    found=f"{len(calls)} calls",
                    fix="distill the bare transformer, not a wrapper that loops over its blocks",
                )
            out[i] = calls[0]
        return out

    # ---------------------------------------------------------------------------------------------- students
    def _chained(self, records: dict[int, BlockCall]) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Every level's chained student inputs, rebuilt from this pass's records (empty without chains)."""
        if not self.chains:
            return {}
        model, spec = self.model, self.spec
        off = disabled(model) if getattr(model, STATE_ATTR, None) is not None else nullcontext()
        with off:  # the kept blocks between spans run as the teacher's
            return chained_inputs(
                model,
                spec,
                self.chains,
                records,
                lambda rep: self.students[student_key(rep.id)],
                lambda j: spec.block(model, j),
            )

    def _student_call(
        self, u: int, call: BlockCall, chained: list[dict[str, torch.Tensor]] | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments the student of a span starting at ``u`` trains on: the teacher's call, with a share of the
        samples' streams taken from chained inputs."""
        if not chained:
            return call.args, call.kwargs
        model, spec = self.model, self.spec
        teacher = {k: v for k, v in spec.split_inputs(model, u, call.args, call.kwargs).items() if k in chained[0]}
        mixed = mix_inputs(teacher, chained, self.chain_mix, self.micro_index)
        return (), call_with_streams(spec, model, u, call, mixed)

    def _nonsequential(
        self, records: dict[int, BlockCall], chained: dict[str, list[dict[str, torch.Tensor]]]
    ) -> dict[str, torch.Tensor]:
        model, spec = self.model, self.spec
        losses = {}
        for rep in self.replacements:
            u, v = rep.span.start, rep.span.stop - 1
            call = records[u]
            args, kwargs = self._student_call(u, call, chained.get(rep.id))
            student = self.students[student_key(rep.id)]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                output = checkpoint(student, *args, use_reentrant=False, **kwargs)
            else:
                output = student(*args, **kwargs)
            pred = spec.split_outputs(model, u, output)
            target = spec.split_outputs(model, v, records[v].output)
            losses[rep.id] = depth_loss(pred, target, {"text": _text_mask(spec, model, u, call)})
        return losses

    def _sequential(self, batch: dict[str, Any], records: dict[int, BlockCall]) -> dict[str, torch.Tensor]:
        model, spec = self.model, self.spec
        assert self.level is not None  # checked in __init__
        firsts = {rep.span.start for rep in self.replacements}
        captured: dict[int, Any] = {}

        def keep(i: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                # First call only: the model's own gradient checkpointing re-runs blocks during backward.
                captured.setdefault(i, output)

            return hook

        # Left at the pruned level on purpose: the model's gradient checkpointing re-runs the blocks in backward,
        # and the recomputation must dispatch exactly as the forward did. The teacher pass (disabled) restores it.
        set_level(model, self.level)
        handles = [spec.block(model, i).register_forward_hook(keep(i)) for i in sorted(firsts)]
        try:
            model(**batch, return_dict=False)
        finally:
            # Removed before backward, so recomputation can never reach them.
            for handle in handles:
                handle.remove()
        losses = {}
        for rep in self.replacements:
            u, v = rep.span.start, rep.span.stop - 1
            pred = spec.split_outputs(model, u, captured[u])
            target = spec.split_outputs(model, v, records[v].output)
            losses[rep.id] = depth_loss(pred, target, {"text": _text_mask(spec, model, u, records[u])})
        return losses

    def _clock(self) -> float:
        if self.measure and torch.cuda.is_available() and any(p.is_cuda for p in self.students.parameters()):
            torch.cuda.synchronize()
        return time.perf_counter()


def _raise_done(module: nn.Module, args: Any, output: Any) -> None:
    raise _TeacherDone
