"""The distillation training loop (depth here; width and fine-tune reuse :class:`TrainingSession`): accelerate,
schedule, metrics, atomic checkpoints and exact resume.

Layout of ``out_dir`` and the rules for an existing one: :mod:`ppcl.distill.run_folder`.

Batches are a pure function of the micro-batch index (see :mod:`ppcl.distill.data`), so a checkpoint only needs the
step number next to the optimiser, scheduler and RNG states; a resumed run reproduces an uninterrupted one exactly.

Multi-process (``accelerate launch`` on GPUs, ``torchrun`` on CPU; docs/scale.md): the global batch of one step is
``batch_size x gradient_accumulation x P`` samples. Process ``rank`` draws micro-batch
``(step * gradient_accumulation + micro) * P + rank``, so the data stays a pure function of (seed, step, rank) and P
processes with accumulation A see exactly the batches of one process with accumulation ``A * P``; DDP averages the
gradients as accumulation would. Only the main process writes metrics, checkpoints and the add-on; the others wait.

Sharded (``shard=True`` or an accelerate FSDP config): see :mod:`ppcl.distill.sharding`; checkpoints stay full tensors.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ppcl.addon import WEIGHTS_FILE, PruningAddon, student_key
from ppcl.distill.checkpoint import (
    check_distributed,
    check_shardable,
    checkpoint_bytes,
    make_accelerator,
    not_finite_anywhere,
    preflight,
    rng_state,
    set_rng_state,
)
from ppcl.distill.config import DistillConfig
from ppcl.distill.data import DistillData
from ppcl.distill.depth import DepthStep, depth_replacements, sequential_level
from ppcl.distill.echo import TeacherEcho
from ppcl.distill.precision import MasterWeights, autocast_dtype, base_dtype, precision_record
from ppcl.distill.resume import apply_changes, resume_changes
from ppcl.distill.run_folder import (
    ADDON_DIR,
    CHECKPOINT_DIR,
    EXTRA_FILE,
    METRICS_FILE,
    STATE_NAME,
    append_metrics_row,
    check_lock,
    check_run_folder,
    claim_run_folder,
    has_trainer_state,
    keep_metrics_rows,
    read_trainer_state,
    release_lock,
)
from ppcl.distill.sharding import SessionShards
from ppcl.errors import ArtefactError, ConfigError, TrainingError
from ppcl.faults import fault_point
from ppcl.io import atomic_folder, load_tensors, save_state, save_tensors
from ppcl.logging import get_logger, progress
from ppcl.outputs import CHECKPOINT
from ppcl.runtime import ADDON_ATTR, STATE_ATTR, active_level, apply_addon, remove_addon, set_level

if TYPE_CHECKING:
    from typing_extensions import Self

log = get_logger("distill")


def distill_depth(
    model: nn.Module,
    addon: PruningAddon,
    data: DistillData,
    config: DistillConfig,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    level: str | None = None,
    stop_at: int | None = None,
    accelerator: Accelerator | None = None,
    overwrite: bool = False,
) -> PruningAddon:
    """Train the add-on's depth students against the frozen teacher (the same ``model`` with the add-on off).

    Args:
        model: the base transformer; the add-on is applied to it if it is not already (and removed again at the end).
        addon: the add-on whose students are trained in place (typically ``PruningAddon.from_plan``).
        data: batches of the transformer's keyword arguments.
        config: hyper-parameters.
        out_dir: receives ``metrics.jsonl``, ``checkpoint/`` and ``addon/``.
        resume: continue from ``out_dir/checkpoint`` (a fresh start when there is none).
        level: train only this level's spans (default: every depth span of the plan).
        stop_at: stop after this many steps with a checkpoint and without ``addon/``, as a pre-empted job would.
        accelerator: a caller-made ``accelerate.Accelerator`` (its mixed precision wins over the config's); by
            default one is made from ``config.mixed_precision``.
        overwrite: start again in an ``out_dir`` that holds a run (only the run's own files are removed); a folder
            with anything else in it is always refused (:mod:`ppcl.distill.run_folder`).

    Returns: the trained add-on (the same object).

    Raises:
        TrainingError: a loss became NaN/Inf (names the step and spans; the last checkpoint is kept).
        ConfigError: bad settings, ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given, or it
            holds files that are not a ppcl run.
    """
    reps = depth_replacements(addon.plan, level)
    run_level = sequential_level(addon.plan, reps, level) if config.mode == "sequential" else None
    keys = {rep.id for rep in reps}
    with TrainingSession(
        model,
        addon,
        data,
        config,
        out_dir,
        resume,
        accelerator,
        shardable=config.mode == "nonsequential",
        overwrite=overwrite,
    ) as session:
        chain_mix = config.chain_mix if config.mode == "nonsequential" else 0.0
        step_module = DepthStep(
            model,
            addon.students,
            reps,
            config.mode,
            run_level,
            config.gradient_checkpointing and config.mode == "nonsequential",
            config.early_stop_teacher,
            chain_mix,
            addon.plan,
        )
        params = [p for rep in reps for p in addon.students[student_key(rep.id)].parameters()]
        addon.students.train()
        if config.mode == "sequential" and config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        stats = session.run(
            step_module,
            params,
            stop_at,
            "depth distillation",
            "spans",
            f"{len(reps)} span(s) {sorted(keys)} ({config.mode}"
            + (f", chain mix {chain_mix:g} over {len(step_module.chains)} chain(s))" if chain_mix else ")"),
        )
    if stats["end"] < config.steps:
        return addon
    addon.metrics["depth_loss"] = stats["final"]
    session.finish(
        "depth",
        stats,
        {
            "method": "PPCL stage 1.3",
            "mode": config.mode,
            "level": level,
            "chain_mix": chain_mix,
            "chains": [[r.id for r in g] for g in step_module.chains],
            "sequential_level": run_level,
            "spans": sorted(keys),
        },
    )
    return addon


class TrainingSession:
    """The stage-independent part of a run (depth, width, fine-tune) as a context manager: on enter it checks the
    config, data and ``out_dir``, makes the accelerator, applies the add-on if needed and freezes the base; on exit
    (errors too) it restores ``requires_grad``, gradient checkpointing and the level, and removes an add-on it
    applied. :meth:`run` drives the accelerate loop for any step module returning ``{term: scalar loss}``.

    Args: ``model, addon, data, config, out_dir, resume, accelerator, overwrite`` as in :func:`distill_depth`;
    ``extra``: trained parameters outside the add-on (a full fine-tune's base blocks), checkpointed as
    ``trained_base.safetensors``;
    ``shardable``: the stage's step module trains only ``step_module.students`` from recorded teacher calls, so it
    may run sharded (non-sequential depth distillation).

    Precision (:mod:`ppcl.distill.precision`): on a bf16/fp16 base the trained parameters get float32 master weights
    in place for the length of :meth:`run` and each step runs under autocast to the base dtype (unless accelerate's
    mixed precision autocasts already); on exit every parameter is back in the dtype it came in, so ``OUT/addon``
    holds students in the base dtype while checkpoints keep the float32 masters (exact resume).
    """

    def __init__(
        self,
        model: nn.Module,
        addon: PruningAddon,
        data: DistillData,
        config: DistillConfig,
        out_dir: str | os.PathLike[str],
        resume: bool,
        accelerator: Accelerator | None,
        extra: dict[str, nn.Parameter] | None = None,
        shardable: bool = False,
        overwrite: bool = False,
    ) -> None:
        config.validate()
        if not callable(getattr(data, "batch", None)):
            raise ConfigError("the data source has no batch(step) method", expected="a DistillData", found=str(data))
        if getattr(data, "batch_size", None) not in (None, config.batch_size):
            raise ConfigError(
                "the data source and the config disagree on the batch size",
                expected=f"batch_size {config.batch_size} (config)",
                found=f"{data.batch_size} (data)",
                fix="build the data source with the config's batch size",
            )
        self.out = Path(out_dir)
        self.accelerator = accelerator or make_accelerator(config.mixed_precision)
        check_distributed(self.accelerator)
        kind = str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))
        self.shard, self.shards = config.shard or kind == "FSDP", None
        if self.shard:
            check_shardable(config, shardable, kind)
        trained = sum(p.numel() for p in addon.students.parameters()) + sum(p.numel() for p in (extra or {}).values())
        # Every process checks (they may not share a file system); only the main one repairs an interrupted swap.
        preflight(self.out, checkpoint_bytes(trained))
        # Every process refuses before any one writes (the folder is claimed in __enter__).
        check_lock(self.out)
        self.clear = check_run_folder(self.out, resume, overwrite)
        self.model, self.addon, self.data, self.config, self.resume = model, addon, data, config, resume
        self.extra, self.stage, self.terms_key = dict(extra or {}), "distillation", "terms"
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise ConfigError(
                "fp16 mixed precision needs a GPU", expected="bf16 or no on CPU", found="fp16", fix="use bf16"
            )
        # Read before anything is upcast (a full fine-tune trains base blocks): the dtype the base runs in.
        self.base_dtype = base_dtype(model, skip=ADDON_ATTR)
        self.mixed_precision = str(getattr(self.accelerator, "mixed_precision", config.mixed_precision))
        self.autocast_dtype = autocast_dtype(self.base_dtype, self.mixed_precision)
        self.masters = MasterWeights(())
        self.resume_changes: dict[str, list[Any]] = {}

    def __enter__(self) -> Self:
        self._claim_folder()
        try:
            return self._enter()
        except BaseException:  # __exit__ does not run when __enter__ fails: free the folder here
            self._release_folder()
            raise

    def _claim_folder(self) -> None:
        """Lock the run folder for this run (main process), clear it if ``overwrite`` starts it again, mark it, and
        put back a checkpoint an interrupted swap left aside."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            claim_run_folder(self.out, self.clear)
        self.accelerator.wait_for_everyone()

    def _release_folder(self) -> None:
        if self.accelerator.is_main_process:
            release_lock(self.out)

    def _enter(self) -> Self:
        model = self.model
        state = getattr(model, STATE_ATTR, None)
        if state is not None and state.addon.students is not self.addon.students:
            raise ConfigError(
                "another add-on is applied to the model",
                expected="the add-on being trained, or none",
                found="a different add-on under model.ppcl",
                fix="remove_addon(model) first",
            )
        if self.shard:
            return self._enter_sharded(state is not None)
        self.applied_here = state is None
        if self.applied_here:
            apply_addon(model, self.addon, level=None)
        self.level_before = active_level(model)
        self.frozen = {name: p.requires_grad for name, p in model.named_parameters()}
        self.checkpointing_before = bool(getattr(model, "gradient_checkpointing", False))
        model.requires_grad_(False).eval()
        if any(p.device != self.accelerator.device for p in model.parameters()):
            model.to(self.accelerator.device)
        return self

    def _enter_sharded(self, applied: bool) -> Self:
        """The sharded session runs the bare model (the students are called directly), so an applied add-on is taken
        off for its length and put back at the level it had."""
        model = self.model
        self.reapply = active_level(model) if applied else False
        if applied:
            remove_addon(model)
        self.applied_here, self.level_before, self.checkpointing_before = False, None, False
        self.frozen = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False).eval()
        self.shards = SessionShards(model, self.accelerator.device)
        try:
            self.shards.shard_teacher()
        except BaseException:  # __exit__ does not run when __enter__ fails: put the blocks back here
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._restore_model()
        finally:
            self._release_folder()

    def _restore_model(self) -> None:
        model = self.model
        if self.shards is not None:
            self.shards.close()
            self.shards = None
        self.masters.restore()  # the trained modules go back to the dtype they came in (OUT/addon is saved after)
        for name, p in model.named_parameters():
            p.requires_grad_(self.frozen.get(name, p.requires_grad))
        if bool(getattr(model, "gradient_checkpointing", False)) and not self.checkpointing_before:
            model.disable_gradient_checkpointing()
        if self.shard:
            if self.reapply is not False:
                apply_addon(model, self.addon, level=self.reapply)
        elif self.applied_here:
            remove_addon(model)
        else:
            set_level(model, self.level_before)

    def run(
        self,
        step_module: nn.Module,
        params: list[nn.Parameter],
        stop_at: int | None,
        stage: str,
        terms_key: str,
        what: str,
    ) -> dict[str, Any]:
        """Optimise ``params`` (AdamW + schedule) on the summed losses of ``step_module(**batch)``; returns
        ``{"final": {term: loss}, "end": last step, "elapsed", "seconds_per_step", "teacher_ratio"}``."""
        config, accelerator = self.config, self.accelerator
        self.stage, self.terms_key, self.params, self.what = stage, terms_key, params, what
        for p in params:
            p.requires_grad_(True)
        # Before loading a checkpoint (its float32 masters load exactly) and before sharding (twins share storage).
        self.masters = MasterWeights(params)
        saved = self._load_weights()
        if self.shards is not None:
            owner = {id(p): key for key, module in step_module.students.items() for p in module.parameters()}
            keys = list(dict.fromkeys(owner[id(p)] for p in params))
            step_module.students = self.shards.shard_trained(step_module.students, keys)
            # The optimiser's state is saved by parameter index: keep the unsharded order, or a checkpoint would
            # resume across layouts with moments swapped between same-shaped students.
            self.params = params = self.shards.twins_of(params)
        # On GPUs, fused: the default multi-tensor step allocates a temporary as large as the trained parameters
        # (measured at real size, docs/scale.md). CPUs keep the default path.
        fused = True if params and all(p.device.type == "cuda" for p in params) else None
        opt = torch.optim.AdamW(params, config.lr, config.betas, weight_decay=config.weight_decay, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor)
        if self.shards is None:
            self.step_module, self.opt = accelerator.prepare(step_module, opt)
        else:  # FSDP2 does the sharding and gradient averaging itself; accelerate only autocasts (in _loop)
            self.step_module, self.opt = step_module, opt
        start, elapsed, last = self._start(saved)
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        log.info(
            "%s: %s, steps %d..%d of %d%s, %d trainable parameters",
            stage,
            what,
            start,
            end,
            config.steps,
            " (stopping early: resume with resume=True)" if end < config.steps else "",
            sum(p.numel() for p in params),
        )
        return {**self._loop(start, end, elapsed, last), "end": end}

    def finish(self, key: str, stats: dict[str, Any], fields: dict[str, Any]) -> None:
        """Record ``addon.provenance[key]`` (``fields`` + the common run fields), write ``out_dir/addon`` and log."""
        data, config = self.data, self.config
        self.addon.provenance[key] = {
            **fields,
            "config": config.to_json(),
            "steps": config.steps,
            "data": data.describe() if hasattr(data, "describe") else {"source": type(data).__name__},
            "seconds_per_step": stats["seconds_per_step"],
            "teacher_forward_ratio": stats["teacher_ratio"],
            "mixed_precision": config.mixed_precision,
            "num_processes": self.accelerator.num_processes,
            "precision": precision_record(self.base_dtype, self.autocast_dtype, self.mixed_precision),
            **({"resumed_with_changes": self.resume_changes} if self.resume_changes else {}),
        }
        if self.accelerator.is_main_process:
            self.addon.save_pretrained(self.out / ADDON_DIR, overwrite=True)  # atomic by itself; the run owns it
        self.accelerator.wait_for_everyone()
        log.info(
            "%s: done in %.1f s, final loss %.5f; add-on at %s",
            self.stage,
            stats["elapsed"],
            sum(stats["final"].values()),
            self.out / ADDON_DIR,
        )

    def _loop(self, start: int, end: int, elapsed: float, last: dict[str, float]) -> dict[str, Any]:
        """Steps ``start..end``; ``last`` is the last step's losses so far (a checkpoint's, on resume)."""
        accelerator, step_module, config = self.accelerator, self.step_module, self.config
        inner, accum, reuse = accelerator.unwrap_model(step_module), config.gradient_accumulation, config.teacher_reuse
        inner.echo = TeacherEcho(accum if reuse > 1 else 0)
        autocast = self._autocast
        procs, rank = accelerator.num_processes, accelerator.process_index
        t0, t_run = time.perf_counter() - elapsed, time.perf_counter()
        window: dict[str, list[float]] = {}
        ratios: list[float] = []
        for step in progress(range(start, end), desc=self.stage, total=end - start):
            inner.measure = measure = (step + 1) % config.log_every == 0 or step + 1 == end
            t_step = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            teacher_s = 0.0
            for micro in range(accum):
                # Data echoing: a new batch every `teacher_reuse` steps; the step module keeps its teacher pass.
                index = ((step // reuse) * accum + micro) * procs + rank
                batch = {
                    k: (v.to(accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                    for k, v in self.data.batch(index).items()
                }
                # Step modules that draw per batch (a fine-tune's level) key their draws on the micro-batch index,
                # the same on every process (all ranks train one level per step) and on resume; random tensors
                # key on the data index, which differs between processes.
                inner.micro_index, inner.data_index = step * accum + micro, index
                with accelerator.no_sync(step_module) if micro < accum - 1 else nullcontext():
                    with autocast():
                        losses = step_module(**batch)
                    values = self._check_finite(losses, step)
                    accelerator.backward(torch.stack(list(losses.values())).sum() / accum)
                teacher_s += getattr(inner, "timing", {}).get("teacher_s", 0.0) if measure else 0.0
                for key, value in zip(losses, values, strict=True):
                    sums[key] = sums.get(key, 0.0) + value / accum
            if config.grad_clip is not None:
                norm = self._clip()
                if norm is not None and not math.isfinite(norm):
                    self._not_finite(step, "gradient norm", [f"of all {self.terms_key}"], [float(norm)])
            lr = self.sched.get_last_lr()[0]
            self.opt.step()
            self.sched.step()
            if measure:
                inner.measure = False
                ratios.append(teacher_s / max(time.perf_counter() - t_step, 1e-9))
            last = sums
            for key, value in sums.items():
                window.setdefault(key, []).append(value)
            if measure or step + 1 == end:
                self._log_row(step + 1, window, lr, time.perf_counter() - t0)
                window = {}
            fault_point("step", step + 1)
            if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == end:
                self._save_checkpoint(step + 1, time.perf_counter() - t0, last)
        inner.echo.clear()  # the kept teacher tensors are not needed past the run
        return {
            "final": last,
            "elapsed": time.perf_counter() - t0,
            "seconds_per_step": round((time.perf_counter() - t_run) / max(1, end - start), 6),
            "teacher_ratio": round(float(np.mean(ratios)), 4) if ratios else None,
        }

    def _autocast(self) -> AbstractContextManager[Any]:
        """The autocast of one micro-batch: to a low-precision base's dtype, else accelerate's when sharded (FSDP2 is
        not wrapped by ``prepare``), else none (``prepare`` already wrapped the step module in its autocast)."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)
        return self.accelerator.autocast() if self.shards is not None else nullcontext()

    def _clip(self) -> float | None:
        """Clip the global gradient norm; returns it (the same value on every process)."""
        if self.shards is None:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.grad_clip)
            return None if norm is None else float(norm)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)  # a replicated DTensor
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _check_finite(self, losses: dict[str, torch.Tensor], step: int) -> list[float]:
        """The losses averaged over processes; raises on all of them at once when any is NaN/Inf (a rank raising
        alone would leave the others waiting in the next all-reduce)."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.clone(), reduction="mean")  # NaN anywhere → NaN everywhere
        floats = values.tolist()
        bad = [key for key, v in zip(losses, floats, strict=True) if not math.isfinite(v)]
        if bad:
            self._not_finite(step, "loss", bad, [floats[list(losses).index(k)] for k in bad])
        return floats

    def _not_finite(self, step: int, what: str, keys: list[str], values: list[float]) -> None:
        kept = self.out / CHECKPOINT_DIR
        then = f"resume from the last good checkpoint {kept}" if kept.exists() else "start again"
        raise TrainingError(
            f"{self.stage} {what} is not finite at step {step + 1} of {self.config.steps} for {self.terms_key} "
            f"{', '.join(keys)}",
            expected=f"a finite {what}",
            found=", ".join(f"{key}={v}" for key, v in zip(keys, values, strict=True)),
            fix=f"lower the learning rate or use bf16 instead of fp16, then {then}",
        )

    def _refuse_not_finite_state(self, step: int) -> None:
        """Raise before a checkpoint of a non-finite state is written (every process, so none waits alone); the
        previous checkpoint stays the last good one."""
        bad = not_finite_anywhere(self.params, self.opt, self.accelerator)
        if not bad:
            return
        kept = self.out / CHECKPOINT_DIR
        then = f"resume (--resume --lr ...) from the last good checkpoint {kept}" if kept.exists() else "start again"
        raise TrainingError(
            f"{self.stage}: the {' and '.join(bad)} are not finite after step {step} of "
            f"{self.config.steps} ({self.what}); the checkpoint of this step was not written",
            expected="finite weights, gradients and optimiser moments",
            found=", ".join(bad),
            fix=f"lower the learning rate or use bf16 instead of fp16, then {then}",
        )

    def _log_row(self, step: int, window: dict[str, list[float]], lr: float, seconds: float) -> None:
        if not self.accelerator.is_main_process:
            return
        terms = {key: float(np.mean(values)) for key, values in window.items()}
        row = {"step": step, "loss": sum(terms.values()), self.terms_key: terms, "lr": lr, "seconds": round(seconds, 3)}
        append_metrics_row(self.out, row)

    def _save_checkpoint(self, step: int, elapsed: float, last: dict[str, float]) -> None:
        self.accelerator.wait_for_everyone()
        self._refuse_not_finite_state(step)
        optimizer = None
        if self.shards is not None:  # collectives: every process gathers, the main one writes
            self.shards.pull()
            optimizer = self.shards.full_optimizer_state(self.opt)
        if self.accelerator.is_main_process:
            # data_index: the next micro-batch to draw (batches are a function of it, so nothing else is needed).
            state = {
                "step": step,
                "data_index": step // self.config.teacher_reuse * self.config.gradient_accumulation,
                "elapsed": elapsed,
                "trains": self.what,
                "last_losses": last,
                "config": self.config.to_json(),
                "optimizer": self.opt.state_dict() if optimizer is None else optimizer,
                "scheduler": self.sched.state_dict(),
                "rng": rng_state(),
            }
            self.addon.provenance["checkpoint"] = {"step": step}
            with atomic_folder(self.out / CHECKPOINT_DIR, CHECKPOINT, overwrite=True) as tmp:
                self.addon.save_pretrained(tmp)  # first: it may replace the folder it is given
                save_state(state, tmp, STATE_NAME)
                if self.extra:
                    save_tensors({k: p.detach() for k, p in self.extra.items()}, tmp / EXTRA_FILE)
                fault_point("checkpoint", step)
            self.addon.provenance.pop("checkpoint", None)
        self.accelerator.wait_for_everyone()

    def _load_weights(self) -> dict[str, Any] | None:
        """A resumed run's trainer state, after loading the checkpoint's weights into the add-on (and ``extra``);
        ``None`` for a fresh run. Runs before sharding, so the shards are cut from the loaded weights."""
        folder = self.out / CHECKPOINT_DIR
        if not (self.resume and has_trainer_state(folder)):
            return None
        state = read_trainer_state(folder)
        try:  # the file's keys are the students' own state-dict keys ("<student key>.<param>")
            self.addon.students.load_state_dict(load_tensors(folder / WEIGHTS_FILE, "checkpoint add-on"), strict=True)
            saved = load_tensors(folder / EXTRA_FILE, "checkpoint base") if self.extra else {}
            for key, p in self.extra.items():
                p.data.copy_(saved[key])
        except (RuntimeError, KeyError) as exc:
            raise ArtefactError(
                "the checkpoint holds another run's weights",
                expected="the weights of this run's plan",
                found=str(exc).splitlines()[0],
                fix="resume with the plan (and settings) the run started with",
            ) from exc
        return state

    def _start(self, state: dict[str, Any] | None) -> tuple[int, float, dict[str, float]]:
        out, config, stage, folder = self.out, self.config, self.stage, self.out / CHECKPOINT_DIR
        if state is None:
            if self.resume:
                log.info("%s: no checkpoint in %s, starting fresh", stage, out)
            if self.accelerator.is_main_process:
                (out / METRICS_FILE).unlink(missing_ok=True)
            for seed in (torch.manual_seed, np.random.seed, random.seed):
                seed(config.seed)
            return 0, 0.0, {}
        self.resume_changes = resume_changes(state, config, self.what)  # refuses a change of run
        optimizer = state["optimizer"]
        if self.shards is not None:
            optimizer = self.shards.sharded_optimizer_state(optimizer, self.params)
        self.opt.load_state_dict(optimizer)
        self.sched.load_state_dict(state["scheduler"])
        if self.resume_changes:
            apply_changes(self.opt, self.sched, config, int(state["step"]))
            log.warning(
                "%s: resuming with changed settings %s (applied from step %d; recorded in the add-on's provenance)",
                stage,
                self.resume_changes,
                state["step"],
            )
        set_rng_state(state["rng"])
        if self.accelerator.is_main_process:  # drop the rows logged after the checkpoint: they are logged again
            keep_metrics_rows(out, int(state["step"]))
        log.info("%s: resuming from %s at step %d", stage, folder, state["step"])
        # The last step's losses: the add-on's metrics when the checkpoint is the run's last step (no step left).
        raw = state.get("last_losses")
        last = (
            {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}
        )
        return int(state["step"]), float(state["elapsed"]), last
