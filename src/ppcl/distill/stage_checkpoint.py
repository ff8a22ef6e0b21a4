"""Checkpoints of a :class:`~ppcl.distill.stage_run.StageRun`: write one (atomically, never of a non-finite state),
load one into the add-on, and resume the optimiser, schedule, RNGs and metrics log from it.

A checkpoint folder is a valid add-on plus ``trainer_state.json`` / ``.safetensors`` (nothing pickled; layout in
:mod:`ppcl.distill.run_folder`), so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ppcl.addon import WEIGHTS_FILE
from ppcl.distill.checkpoint import rng_state, set_rng_state
from ppcl.distill.resume import apply_changes, resume_changes
from ppcl.distill.run_folder import (
    CHECKPOINT_DIR,
    EXTRA_FILE,
    METRICS_FILE,
    STATE_NAME,
    has_trainer_state,
    keep_metrics_rows,
    read_trainer_state,
)
from ppcl.errors import ArtefactError
from ppcl.faults import fault_point
from ppcl.io import atomic_folder, load_tensors, save_state, save_tensors
from ppcl.logging import get_logger
from ppcl.outputs import CHECKPOINT

if TYPE_CHECKING:
    from ppcl.distill.stage_run import StageRun

log = get_logger("distill")


class Resumed(NamedTuple):
    """Where a run starts: its step, the seconds already spent, the last step's losses and the applied setting
    changes (``{name: [old, new]}``; empty for a fresh run)."""

    step: int
    elapsed: float
    last: dict[str, float]
    changes: dict[str, list[Any]]


def save_checkpoint(run: StageRun, step: int, elapsed: float, last: dict[str, float]) -> None:
    """Write ``run``'s checkpoint of ``step`` atomically (main process; every process gathers when sharded); a
    non-finite state is refused first, so the previous checkpoint stays the last good one."""
    run.accelerator.wait_for_everyone()
    run.refuse_not_finite_state(step)
    optimizer = None
    if run.shards is not None:  # collectives: every process gathers, the main one writes
        run.shards.pull()
        optimizer = run.shards.full_optimizer_state(run.opt)
    if run.accelerator.is_main_process:
        # data_index: the next micro-batch to draw (batches are a function of it, so nothing else is needed).
        state = {
            "step": step,
            "data_index": step // run.config.teacher_reuse * run.config.gradient_accumulation,
            "elapsed": elapsed,
            "trains": run.what,
            "last_losses": last,
            "config": run.config.to_json(),
            "optimizer": run.opt.state_dict() if optimizer is None else optimizer,
            "scheduler": run.sched.state_dict(),
            "rng": rng_state(),
        }
        run.addon.provenance["checkpoint"] = {"step": step}
        with atomic_folder(run.out / CHECKPOINT_DIR, CHECKPOINT, overwrite=True) as tmp:
            run.addon.save_pretrained(tmp)  # first: it may replace the folder it is given
            save_state(state, tmp, STATE_NAME)
            if run.extra:
                save_tensors({k: p.detach() for k, p in run.extra.items()}, tmp / EXTRA_FILE)
            fault_point("checkpoint", step)
        run.addon.provenance.pop("checkpoint", None)
    run.accelerator.wait_for_everyone()


def load_checkpoint(run: StageRun) -> dict[str, Any] | None:
    """A resumed run's trainer state, after loading the checkpoint's weights into the add-on (and ``extra``);
    ``None`` for a fresh run. Runs before sharding, so the shards are cut from the loaded weights."""
    folder = run.out / CHECKPOINT_DIR
    if not (run.resume and has_trainer_state(folder)):
        return None
    state = read_trainer_state(folder)
    try:  # the file's keys are the students' own state-dict keys ("<student key>.<param>")
        run.addon.students.load_state_dict(load_tensors(folder / WEIGHTS_FILE, "checkpoint add-on"), strict=True)
        saved = load_tensors(folder / EXTRA_FILE, "checkpoint base") if run.extra else {}
        for key, p in run.extra.items():
            p.data.copy_(saved[key])
    except (RuntimeError, KeyError) as exc:
        raise ArtefactError(
            "the checkpoint holds another run's weights",
            expected="the weights of this run's plan",
            found=str(exc).splitlines()[0],
            fix="resume with the plan (and settings) the run started with",
        ) from exc
    return state


def resume_from(run: StageRun, state: dict[str, Any] | None) -> Resumed:
    """Seed a fresh run, or load ``state`` (from :func:`load_checkpoint`) into the optimiser, schedule and RNGs,
    apply allowed setting changes and drop the metrics rows logged after the checkpoint."""
    out, config, stage, folder = run.out, run.config, run.stage, run.out / CHECKPOINT_DIR
    if state is None:
        if run.resume:
            log.info("%s: no checkpoint in %s, starting fresh", stage, out)
        if run.accelerator.is_main_process:
            (out / METRICS_FILE).unlink(missing_ok=True)
        for seed in (torch.manual_seed, np.random.seed, random.seed):
            seed(config.seed)
        return Resumed(0, 0.0, {}, {})
    changes = resume_changes(state, config, run.what)  # refuses a change of run
    optimizer = state["optimizer"]
    if run.shards is not None:
        optimizer = run.shards.sharded_optimizer_state(optimizer, run.params)
    run.opt.load_state_dict(optimizer)
    run.sched.load_state_dict(state["scheduler"])
    if changes:
        apply_changes(run.opt, run.sched, config, int(state["step"]))
        log.warning(
            "%s: resuming with changed settings %s (applied from step %d; recorded in the add-on's provenance)",
            stage,
            changes,
            state["step"],
        )
    set_rng_state(state["rng"])
    if run.accelerator.is_main_process:  # drop the rows logged after the checkpoint: they are logged again
        keep_metrics_rows(out, int(state["step"]))
    log.info("%s: resuming from %s at step %d", stage, folder, state["step"])
    # The last step's losses: the add-on's metrics when the checkpoint is the run's last step (no step left).
    raw = state.get("last_losses")
    last = {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}
    return Resumed(int(state["step"]), float(state["elapsed"]), last, changes)
