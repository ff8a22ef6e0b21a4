"""Width distillation (METHOD.md Stage 2): least-squares initialisation, then non-sequential gradient training.

Teacher tensors of each projection (one rule for Qwen-Image, FLUX.1 and SD3/3.5: their stock attention processors
feed the modulated text features to ``attn.add_k_proj``, where ppcl's width forward feeds ``z_j``):

* ``z_i`` of a block position ``i`` = the input of ``attn.add_k_proj`` of the module occupying ``i`` (teacher block,
  or the depth student starting there) called on the teacher's input of ``i``: the modulated text features
  ``(B, N_txt, D)`` (``txt_norm1`` + ``txt_mod`` shift/scale in Qwen-Image; ``norm1_context`` output in FLUX.1/SD3).
  ``L_j``: ``z_a → z_j`` (anchor ``a``, text-pruned ``j``).
* ``h_a`` = the teacher's text output of position ``a`` (block ``a``, or the end of the depth span starting at
  ``a``): the text hidden state that passes through the run. ``L_h``: ``h_a →`` the teacher's text output of
  position ``b`` (the run's last block).
* ``g`` = the input of the second-half norm (ArchSpec ``ffn_input``: ``img_norm2``/``txt_norm2``, ``norm2``/
  ``norm2_context``) of the occupant of ``i``; ``ffn_i__s``: ``g → `` the teacher's stream ``s`` output of ``i``.

:func:`init_width_projections` fits every projection of a level in closed form from float64 Gram statistics over the
whole calibration set (:class:`~ppcl.analysis.probes.ProbeAccumulator`; padded text tokens excluded). One teacher pass
records these tensors for a level (:class:`~ppcl.distill.width_capture.TeacherCapture`).
:class:`WidthStep` computes one batch's losses from ONE frozen teacher pass: every width-modified position runs in its
pruned form on the teacher's inputs (the text stream of a text-pruned block is ``h_a``, its ``z_a`` the anchor's),
``L_width`` = normalised block-output loss against the teacher (streams the block changes), ``L_linear`` = MSE of
each projection's output against the teacher tensor at the same point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ppcl.addon import PruningAddon
from ppcl.analysis.probes import ProbeAccumulator
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet
from ppcl.distill.data import DistillData
from ppcl.distill.depth import _text_mask
from ppcl.distill.echo import NO_ECHO, TeacherEcho
from ppcl.distill.losses import depth_loss
from ppcl.distill.run_folder import CHECKPOINT_DIR, has_trainer_state
from ppcl.distill.trainer import DistillConfig, TrainingSession
from ppcl.distill.width_capture import Capture, Position, TeacherCapture, width_positions
from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.modules.width import RunContext, width_forward
from ppcl.runtime.width import parts_for, projection_keys

log = get_logger("distill")
LinearLoss = Literal["mse", "relative"]
__all__ = [
    "Capture",
    "LinearLoss",
    "Position",
    "TeacherCapture",
    "WidthStep",
    "distill_width",
    "init_width_projections",
    "width_positions",
]


def init_width_projections(
    model: nn.Module, addon: PruningAddon, level: str, batches: Iterable[dict[str, Any]], ridge: float = 1e-4
) -> dict[str, float]:
    """Least-squares initialisation of every projection of ``level`` from all of ``batches`` (in place).

    Each projection's ``(input, target)`` token pairs (see the module docstring) are accumulated in float64 over every
    batch (padded text tokens skipped), then solved once with a ridge relative to ``trace(Σ xᵀx) / D``.

    Returns: ``{projection key: relative fit error ‖L(x) − y‖ / ‖y − x‖}`` over the accumulated tokens.
    """
    positions = width_positions(addon.plan, level)
    capture = TeacherCapture(model, addon.students, positions)
    accs: dict[str, ProbeAccumulator] = {}
    n_batches, device = 0, next(model.parameters()).device
    for batch in batches:
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        cap = capture(batch)
        for key, x, y, mask in capture.pairs(cap, addon.plan, level):
            if y is None:
                continue  # a block without text output (SD3's last) leaves L_h at the identity
            acc = accs.setdefault(key, ProbeAccumulator(x.shape[-1], residual=True))
            acc.update(x, y, None if mask is None else mask != 0)
        n_batches += 1
    if not n_batches:
        raise ConfigError(
            "no calibration batch for the least-squares initialisation",
            expected=">= 1 batch",
            found="0",
            fix="pass a non-empty calibration set",
        )
    errors = {key: addon.students[key].fit_from(acc, ridge) for key, acc in sorted(accs.items())}
    log.info(
        "width init: %d projection(s) of level %r from %d batch(es), %d tokens max; relative errors %s",
        len(errors),
        level,
        n_batches,
        max((a.n_tokens for a in accs.values()), default=0),
        {k: round(v, 5) for k, v in errors.items()},
    )
    return errors


def _mse(pred: Tensor, target: Tensor, mask: Tensor | None, relative: bool) -> Tensor:
    """Mean over valid tokens of ``‖pred − target‖² / D`` (float32); ``relative`` divides by the target's energy."""
    err = (pred.float() - target.detach().float()).pow(2).mean(-1)
    energy = target.detach().float().pow(2).mean(-1)
    weight = torch.ones_like(err) if mask is None else (mask != 0).to(err.dtype)
    loss = (err * weight).sum() / weight.sum().clamp_min(1.0)
    if relative:
        loss = loss / ((energy * weight).sum() / weight.sum().clamp_min(1.0)).clamp_min(1e-12)
    return loss


class WidthStep(nn.Module):
    """Per-term width losses of one batch; the trained projections (and, jointly, depth students) are its modules.

    Loss terms: ``width/<i>`` (normalised output loss of position ``i``) and ``linear/<projection key>``
    (``linear_weight`` × MSE of the projection's output against the teacher tensor at the same point).

    Args:
        model, addon, level: the transformer with ``addon`` applied, and the level whose width replacements train.
        train_students: also train the depth students that occupy width-modified positions (in their width mode).
        linear_weight: weight of the ``L_linear`` terms.
        linear_loss: ``"mse"`` (METHOD) or ``"relative"`` (divided by the target's mean energy, scale-free).
        early_stop: end the teacher pass after the last block needed.
    """

    def __init__(
        self,
        model: nn.Module,
        addon: PruningAddon,
        level: str,
        train_students: bool = False,
        linear_weight: float = 1.0,
        linear_loss: LinearLoss = "mse",
        early_stop: bool = True,
    ) -> None:
        super().__init__()
        if linear_loss not in ("mse", "relative"):
            raise ConfigError("unknown linear loss", expected="'mse' or 'relative'", found=repr(linear_loss))
        self.__dict__["model"] = model  # a plain attribute: accelerate must never wrap the teacher
        self.plan, self.level, self.spec = addon.plan, level, get_spec(model)
        self.positions = width_positions(addon.plan, level)
        self.capture = TeacherCapture(model, addon.students, self.positions, early_stop)
        self.reps = addon.plan.replacements_of(level)
        self.keys = [k for r in self.reps for k in projection_keys(r)]  # the projections, hooked for L_linear
        joint = sorted({p.student for p in self.positions if p.trained and p.student is not None})
        self.trained = nn.ModuleDict({k: addon.students[k] for k in self.keys + (joint if train_students else [])})
        # The capture runs the depth students of width positions: echoing it is exact only while they are frozen.
        self.echoable = not (train_students and joint)
        self.students = addon.students
        self.linear_weight, self.relative = linear_weight, linear_loss == "relative"
        self.measure, self.timing = False, {}
        self.micro_index, self.data_index = 0, None  # set by the loop before each call (StepModule)

    model: nn.Module
    echo: TeacherEcho = NO_ECHO  # the trainer sets its own (data echoing)

    def forward(self, **batch: Any) -> dict[str, Tensor]:
        """``{term: scalar loss}`` for ``batch`` (the transformer's keyword arguments)."""
        t0 = time.perf_counter()
        key = self.data_index if self.echoable else None
        cap = self.echo.get(key, lambda: self.capture(batch))  # echoed steps reuse it (DistillConfig.teacher_reuse)
        t1 = time.perf_counter()
        targets = {key: (y, mask) for key, _, y, mask in self.capture.pairs(cap, self.plan, self.level)}
        losses: dict[str, Tensor] = {}
        for pos in self.positions:
            if pos.trained:
                losses.update(self._position(pos, cap, targets))
        if self.measure:
            self.timing = {"teacher_s": t1 - t0, "forward_s": time.perf_counter() - t0}
        return losses

    def _position(self, pos: Position, cap: Capture, targets: dict[str, Any]) -> dict[str, Tensor]:
        model, spec, i = self.model, self.spec, pos.index
        call = cap.calls[i]
        bound = dict(spec.bind_call(model, i, call.args, call.kwargs))
        ctx = RunContext() if pos.run is not None else None
        if pos.mode.text in ("pruned", "last"):
            assert pos.run is not None and ctx is not None
            # The pruned model hands block j the anchor's text output (passed through) and the anchor's z_a.
            bound[dict(spec.stack_of(model, i).stream_inputs)["text"]] = self.capture.output(
                cap, pos.run.anchor, "text"
            )
            ctx.z = cap.z[pos.run.anchor]
        parts = parts_for(self.students, self.plan, self.reps, i, pos.mode)
        outputs: dict[str, Tensor] = {}  # filled by the projections this position calls
        handles = [self.students[k].register_forward_hook(_keep(outputs, k)) for k in self.keys]
        try:
            text, image = width_forward(self.capture.occupant(i), bound, pos.mode, parts, ctx)
        finally:
            for handle in handles:
                handle.remove()
        target = spec.split_outputs(model, pos.last, cap.calls[pos.last].output)
        pred = {"image": image, "text": None if pos.mode.text == "pruned" else text}
        losses = {f"width/{i}": depth_loss(pred, target, {"text": _text_mask(spec, model, i, call)})}
        for key, out in outputs.items():
            y, mask = targets[key]
            if y is not None:
                losses[f"linear/{key}"] = self.linear_weight * _mse(out, y, mask, self.relative)
        return losses


def _keep(store: dict[str, Tensor], key: str) -> Any:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        store[key] = output

    return hook


def distill_width(
    model: nn.Module,
    addon: PruningAddon,
    data: DistillData,
    config: DistillConfig,
    out_dir: str | os.PathLike[str],
    level: str,
    calibration: CalibrationSet | Iterable[dict[str, Any]] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    accelerator: Accelerator | None = None,
    *,
    init: bool = True,
    init_batches: int = 8,
    ridge: float = 1e-4,
    train_students: bool = False,
    linear_weight: float = 1.0,
    linear_loss: LinearLoss = "mse",
    overwrite: bool = False,
) -> PruningAddon:
    """Least-squares initialise, then train, the projections of ``level`` against the frozen teacher.

    Args:
        model, addon, data, config, out_dir, resume, stop_at, accelerator, overwrite: as in
            :func:`~ppcl.distill.trainer.distill_depth` (same folder layout, checkpoints and exact resume;
            ``config.mode`` is ignored: width training is non-sequential).
        level: the level whose text runs / FFN blocks are trained.
        calibration: the least-squares data: a :class:`CalibrationSet` (used whole, in order, in batches of
            ``config.batch_size``), any iterable of batches, or ``None`` (the first ``init_batches`` of ``data``).
        init: run the least-squares initialisation (skipped when resuming from a checkpoint, whose weights win).
        ridge: relative ridge of the least squares.
        train_students: also train the depth students occupying width-modified positions (default: frozen, so
            depth-only levels keep their students exactly).
        linear_weight, linear_loss: see :class:`WidthStep`.

    Returns: the add-on (trained in place), with ``provenance["width"]`` and ``metrics["width_init_rel_error"]``.
    """
    positions = width_positions(addon.plan, level)
    resuming = resume and has_trainer_state(Path(out_dir) / CHECKPOINT_DIR)
    errors: dict[str, float] | None = None
    with TrainingSession(model, addon, data, config, out_dir, resume, accelerator, overwrite=overwrite) as session:
        if init and not resuming:
            batches: Iterable[dict[str, Any]] = (
                calibration.batches(config.batch_size, device=session.accelerator.device)
                if isinstance(calibration, CalibrationSet)
                else calibration
                if calibration is not None
                else (data.batch(i) for i in range(init_batches))
            )
            errors = init_width_projections(model, addon, level, batches, ridge)
        step = WidthStep(model, addon, level, train_students, linear_weight, linear_loss, config.early_stop_teacher)
        params = list(step.trained.parameters())
        what = (
            f"level {level!r}, {sum(p.trained for p in positions)} modified block(s), "
            f"{len(step.trained)} trained module(s)"
        )
        stats = session.run(step, params, stop_at, "width distillation", "terms", what)
    if errors is not None:
        addon.metrics["width_init_rel_error"] = errors
    if stats["end"] < config.steps:
        return addon
    source = (
        calibration.content_hash
        if isinstance(calibration, CalibrationSet)
        else f"first {init_batches} data batches"
        if calibration is None
        else "caller's batches"
    )
    addon.metrics["width_loss"] = stats["final"]
    session.finish(
        "width",
        stats,
        {
            "method": "PPCL stage 2",
            "level": level,
            "trained": sorted(step.trained.keys()),
            "init": None if errors is None else {"ridge": ridge, "rel_error": errors, "source": source},
            "train_students": train_students,
            "linear_weight": linear_weight,
            "linear_loss": linear_loss,
        },
    )
    return addon
