"""One stage's optimisation inside a :class:`~ppcl.distill.session.TrainingSession`: the AdamW optimiser and
schedule, the step loop (accumulation, data echoing, clipping, NaN/Inf checks, metrics) and its checkpoints
(:mod:`ppcl.distill.stage_checkpoint`).

Every attribute is set in :meth:`StageRun.__init__`; the step module it drives follows
:class:`~ppcl.distill.step_module.StepModule`.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ppcl.distill.checkpoint import not_finite_anywhere
from ppcl.distill.echo import TeacherEcho
from ppcl.distill.run_folder import CHECKPOINT_DIR, append_metrics_row
from ppcl.distill.stage_checkpoint import load_checkpoint, resume_from, save_checkpoint
from ppcl.errors import TrainingError
from ppcl.faults import fault_point
from ppcl.logging import get_logger, progress

if TYPE_CHECKING:
    from ppcl.distill.session import TrainingSession
    from ppcl.distill.step_module import StepModule

log = get_logger("distill")


class StageRun:
    """Optimise ``params`` on the summed losses of ``step_module(**batch)`` for one stage of ``session``.

    Args:
        session: the entered session (accelerator, data, config, run folder, sharding, precision).
        step_module: computes ``{term: scalar loss}`` for one batch.
        params: the trained parameters (the session has already given them float32 masters where needed).
        stage, terms_key, what: the stage's name, the metrics key of its loss terms, and what it trains (recorded in
            the checkpoint: a resume must train the same).
    """

    def __init__(
        self,
        session: TrainingSession,
        step_module: StepModule,
        params: list[nn.Parameter],
        stage: str,
        terms_key: str,
        what: str,
    ) -> None:
        self.session, self.config, self.accelerator = session, session.config, session.accelerator
        self.out, self.addon, self.extra, self.shards = session.out, session.addon, session.extra, session.shards
        self.data, self.resume = session.data, session.resume
        self.stage, self.terms_key, self.what = stage, terms_key, what
        self.saved = load_checkpoint(self)  # before sharding, so the shards are cut from the loaded weights
        if self.shards is not None:
            owner = {id(p): key for key, module in step_module.students.items() for p in module.parameters()}
            keys = list(dict.fromkeys(owner[id(p)] for p in params))
            step_module.students = self.shards.shard_trained(step_module.students, keys)
            # The optimiser's state is saved by parameter index: keep the unsharded order, or a checkpoint would
            # resume across layouts with moments swapped between same-shaped students.
            params = self.shards.twins_of(params)
        self.params = params
        config = self.config
        # On GPUs, fused: the default multi-tensor step allocates a temporary as large as the trained parameters
        # (measured at real size, docs/scale.md). CPUs keep the default path.
        fused = True if params and all(p.device.type == "cuda" for p in params) else None
        opt = torch.optim.AdamW(params, config.lr, config.betas, weight_decay=config.weight_decay, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor)
        if self.shards is None:
            self.step_module, self.opt = self.accelerator.prepare(step_module, opt)
        else:  # FSDP2 does the sharding and gradient averaging itself; accelerate only autocasts (in loop)
            self.step_module, self.opt = step_module, opt

    def execute(self, stop_at: int | None) -> dict[str, Any]:
        """Resume (or start) and run to ``stop_at`` (default: the configured steps); returns ``{"final": {term:
        loss}, "end", "elapsed", "seconds_per_step", "teacher_ratio", "stage", "resume_changes"}``."""
        config = self.config
        resumed = resume_from(self, self.saved)
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        log.info(
            "%s: %s, steps %d..%d of %d%s, %d trainable parameters",
            self.stage,
            self.what,
            resumed.step,
            end,
            config.steps,
            " (stopping early: resume with resume=True)" if end < config.steps else "",
            sum(p.numel() for p in self.params),
        )
        stats = self.loop(resumed.step, end, resumed.elapsed, resumed.last)
        return {**stats, "end": end, "stage": self.stage, "resume_changes": resumed.changes}

    def loop(self, start: int, end: int, elapsed: float, last: dict[str, float]) -> dict[str, Any]:
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
                save_checkpoint(self, step + 1, time.perf_counter() - t0, last)
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
        dtype = self.session.autocast_dtype
        if dtype is not None:
            return torch.autocast(self.accelerator.device.type, dtype=dtype)
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

    def refuse_not_finite_state(self, step: int) -> None:
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
