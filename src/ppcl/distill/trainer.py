"""The depth-distillation training loop: accelerate, schedule, metrics, atomic checkpoints and exact resume.

Layout of ``out_dir``::

    metrics.jsonl          one row per logged step: step, loss (total and per span), lr, seconds
    checkpoint/            the latest checkpoint: a valid add-on folder + trainer_state.pt (written atomically)
    addon/                 the final add-on (written when the run reaches ``config.steps``)

Batches are a pure function of the micro-batch index (see :mod:`ppcl.distill.data`), so a checkpoint only needs the
step number next to the optimiser, scheduler and RNG states; a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ppcl.addon import WEIGHTS_FILE, PruningAddon, student_key
from ppcl.distill.data import DistillData
from ppcl.distill.depth import MODES, DepthStep, Mode, depth_replacements, sequential_level
from ppcl.errors import ArtefactError, ConfigError, TrainingError
from ppcl.io import atomic_folder, load_tensors
from ppcl.logging import get_logger, progress
from ppcl.runtime import STATE_ATTR, active_level, apply_addon, remove_addon, set_level

log = get_logger("distill")

CHECKPOINT_DIR = "checkpoint"
ADDON_DIR = "addon"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of depth distillation (defaults: METHOD.md "Training details reported").

    Attributes:
        mode: ``"nonsequential"`` (the method) or ``"sequential"`` (ablation baseline).
        steps: optimiser steps.
        lr: peak learning rate; ``warmup`` linear steps up to it, then cosine decay to ``lr * min_lr_ratio``.
        batch_size: samples per micro-batch; checked against the data source when it says its own.
        gradient_accumulation: micro-batches per optimiser step (the data index is ``step * accumulation + micro``).
        grad_clip: max global gradient norm over the students, ``None`` for none.
        mixed_precision: accelerate's autocast mode; the losses are always computed in float32.
        gradient_checkpointing: recompute activations in backward (students; the whole model in sequential mode).
        checkpoint_every: steps between checkpoints (the last step always checkpoints); 0 = only at the end.
        log_every: steps between metrics rows (each row averages the steps since the previous one).
        seed: seeds torch / numpy / python RNGs at the start of a fresh run.
        early_stop_teacher: end the frozen teacher pass after the last block any span needs.
    """

    mode: Mode = "nonsequential"
    steps: int = 6000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    warmup: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 8
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    early_stop_teacher: bool = True

    def validate(self) -> DistillConfig:
        """Raise :class:`~ppcl.errors.ConfigError` on the first out-of-range value; return ``self``."""
        checks: list[tuple[bool, str, str, Any]] = [
            (self.mode in MODES, "mode", f"one of {MODES}", self.mode),
            (self.steps >= 1, "steps", ">= 1", self.steps), (self.lr > 0, "lr", "> 0", self.lr),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas", "two values in [0, 1)", self.betas),
            (0 <= self.warmup <= self.steps, "warmup", f"0..{self.steps} (steps)", self.warmup),
            (self.schedule in ("cosine", "constant"), "schedule", "cosine or constant", self.schedule),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio),
            (self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", "> 0 or None", self.grad_clip),
            (self.batch_size >= 1, "batch_size", ">= 1", self.batch_size),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "no/bf16/fp16", self.mixed_precision),
            (self.gradient_accumulation >= 1, "gradient_accumulation", ">= 1", self.gradient_accumulation),
            (self.checkpoint_every >= 0, "checkpoint_every", ">= 0", self.checkpoint_every),
            (self.log_every >= 1, "log_every", ">= 1", self.log_every),
        ]
        for ok, name, expected, found in checks:
            if not ok:
                raise ConfigError(f"distillation setting `{name}` is out of range", expected=expected,
                                  found=repr(found))
        return self

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimiser step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


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

    Returns:
        The trained add-on (the same object).

    Raises:
        TrainingError: a loss became NaN/Inf (names the step and spans; the last checkpoint is kept).
        ConfigError: bad settings, or ``out_dir`` already holds a run and ``resume`` is false.
    """
    config.validate()
    out = Path(out_dir)
    reps = depth_replacements(addon.plan, level)
    run_level = sequential_level(addon.plan, reps, level) if config.mode == "sequential" else None
    _check_data(data, config)
    if (out / CHECKPOINT_DIR).exists() and not resume:
        raise ConfigError("the output folder already holds a distillation run", expected="a new folder or resume",
                          found=str(out / CHECKPOINT_DIR), fix="pass resume=True (--resume) or choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)

    accelerator = accelerator or _accelerator(config.mixed_precision)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("fp16 mixed precision needs a GPU", expected="bf16 or no on CPU", found="fp16",
                          fix="use mixed_precision='bf16'")
    applied_here = _ensure_applied(model, addon)
    level_before = active_level(model)
    keys = {rep.id for rep in reps}
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    checkpointing_before = bool(getattr(model, "gradient_checkpointing", False))
    try:
        model.requires_grad_(False).eval()
        if any(p.device != accelerator.device for p in model.parameters()):
            model.to(accelerator.device)
        step_module = DepthStep(model, addon.students, reps, config.mode, run_level,
                                config.gradient_checkpointing and config.mode == "nonsequential",
                                config.early_stop_teacher)
        params = [p for rep in reps for p in addon.students[student_key(rep.id)].parameters()]
        for p in params:
            p.requires_grad_(True)
        addon.students.train()
        if config.mode == "sequential" and config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor)
        step_module, opt = accelerator.prepare(step_module, opt)
        start, elapsed = _start(out, resume, addon, opt, sched, config)
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        log.info("depth distillation (%s): %d span(s) %s, steps %d..%d of %d, %d trainable parameters",
                 config.mode, len(reps), sorted(keys), start, end, config.steps, sum(p.numel() for p in params))
        stats = _loop(accelerator, step_module, opt, sched, params, data, config, out, addon, start, end, elapsed)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, p.requires_grad))
        if config.mode == "sequential" and config.gradient_checkpointing and not checkpointing_before:
            model.disable_gradient_checkpointing()
        if applied_here:
            remove_addon(model)
        else:
            set_level(model, level_before)
    if end < config.steps:
        log.info("depth distillation: stopped at step %d; resume with resume=True", end)
        return addon
    addon.provenance["depth"] = {
        "method": "PPCL stage 1.3", "mode": config.mode, "level": level, "sequential_level": run_level,
        "spans": sorted(keys), "config": config.to_json(), "steps": config.steps,
        "data": data.describe() if hasattr(data, "describe") else {"source": type(data).__name__},
        "seconds_per_step": stats["seconds_per_step"], "teacher_forward_ratio": stats["teacher_ratio"],
        "mixed_precision": config.mixed_precision, "num_processes": accelerator.num_processes,
    }
    addon.metrics["depth_loss"] = stats["final"]
    if accelerator.is_main_process:
        addon.save_pretrained(out / ADDON_DIR)  # atomic by itself
    accelerator.wait_for_everyone()
    log.info("depth distillation: done in %.1f s, final loss %.5f; add-on at %s", stats["elapsed"],
             sum(stats["final"].values()), out / ADDON_DIR)
    return addon


def _loop(accelerator: Accelerator, step_module: nn.Module, opt: Any, sched: Any, params: list[nn.Parameter],
          data: DistillData, config: DistillConfig, out: Path, addon: PruningAddon, start: int, end: int,
          elapsed: float) -> dict[str, Any]:
    inner: DepthStep = accelerator.unwrap_model(step_module)
    accum = config.gradient_accumulation
    t0 = time.perf_counter() - elapsed
    t_run = time.perf_counter()
    window: dict[str, list[float]] = {}
    ratios: list[float] = []
    last: dict[str, float] = {}
    for step in progress(range(start, end), desc="distill depth", total=end - start):
        measure = (step + 1) % config.log_every == 0 or step + 1 == end
        inner.measure = measure
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        teacher_s = 0.0
        for micro in range(accum):
            batch = _to_device(data.batch(step * accum + micro), accelerator.device)
            with accelerator.no_sync(step_module) if micro < accum - 1 else nullcontext():
                losses = step_module(**batch)
                _check_finite(losses, step, config.steps, out)
                accelerator.backward(torch.stack(list(losses.values())).sum() / accum)
            teacher_s += inner.timing.get("teacher_s", 0.0) if measure else 0.0
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        if measure:
            inner.measure = False
            ratios.append(teacher_s / max(time.perf_counter() - t_step, 1e-9))
        last = sums
        for key, value in sums.items():
            window.setdefault(key, []).append(value)
        if measure or step + 1 == end:
            _log_row(accelerator, out, step + 1, window, lr, time.perf_counter() - t0)
            window = {}
        if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == end:
            _save_checkpoint(accelerator, out, addon, opt, sched, step + 1, time.perf_counter() - t0, config)
    return {"final": last, "elapsed": time.perf_counter() - t0,
            "seconds_per_step": round((time.perf_counter() - t_run) / max(1, end - start), 6),
            "teacher_ratio": round(float(np.mean(ratios)), 4) if ratios else None}


def _check_finite(losses: dict[str, torch.Tensor], step: int, steps: int, out: Path) -> None:
    values = torch.stack([v.detach() for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = [key for key, v in zip(losses, values.tolist(), strict=True) if not math.isfinite(v)]
    kept = out / CHECKPOINT_DIR
    then = f"resume from the last good checkpoint {kept}" if kept.exists() else "start again"
    raise TrainingError(
        f"depth distillation loss is not finite at step {step + 1} of {steps} for span(s) {', '.join(bad)}",
        expected="finite losses", found=", ".join(f"{key}={losses[key].item()}" for key in bad),
        fix=f"lower the learning rate or use bf16 instead of fp16, then {then}")


# ------------------------------------------------------------------------------------------- checkpoint / resume
def _save_checkpoint(accelerator: Accelerator, out: Path, addon: PruningAddon, opt: Any, sched: Any, step: int,
                     elapsed: float, config: DistillConfig) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # data_index: the next micro-batch to draw (batches are a function of it, so nothing else is needed).
        state = {"step": step, "data_index": step * config.gradient_accumulation, "elapsed": elapsed,
                 "config": config.to_json(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": _rng_state()}
        addon.provenance["checkpoint"] = {"step": step}
        with atomic_folder(out / CHECKPOINT_DIR) as tmp:
            addon.save_pretrained(tmp)  # first: it may replace the folder it is given
            torch.save(state, tmp / STATE_FILE)
        addon.provenance.pop("checkpoint", None)
    accelerator.wait_for_everyone()


def _start(out: Path, resume: bool, addon: PruningAddon, opt: Any, sched: Any,
           config: DistillConfig) -> tuple[int, float]:
    folder = out / CHECKPOINT_DIR
    if not (resume and (folder / STATE_FILE).is_file()):
        if resume:
            log.info("depth distillation: no checkpoint in %s, starting fresh", out)
        (out / METRICS_FILE).unlink(missing_ok=True)
        for seed in (torch.manual_seed, np.random.seed, random.seed):
            seed(config.seed)
        return 0, 0.0
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    changed = sorted(k for k, v in state.get("config", {}).items()
                     if k not in ("checkpoint_every", "log_every") and config.to_json().get(k) != v)
    if changed:
        log.warning("depth distillation: resuming with changed settings %s; the run will not match an "
                    "uninterrupted one", changed)
    try:  # the file's keys are the students' own state-dict keys ("<student key>.<param>")
        addon.students.load_state_dict(load_tensors(folder / WEIGHTS_FILE, "checkpoint add-on"), strict=True)
    except RuntimeError as exc:
        raise ArtefactError("the checkpoint holds another add-on's students", expected="the students of this plan",
                            found=str(exc).splitlines()[0], fix="resume with the plan the run started with") from exc
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    _truncate_metrics(out / METRICS_FILE, int(state["step"]))
    log.info("depth distillation: resuming from %s at step %d", folder, state["step"])
    return int(state["step"]), float(state["elapsed"])


def _rng_state() -> dict[str, Any]:
    # Plain tensors/ints/strings only, so the file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, torch.tensor(py_state, dtype=torch.int64), gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))


# ------------------------------------------------------------------------------------------------------- helpers
def _accelerator(mixed_precision: str) -> Accelerator:
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError:
        # accelerate keeps one process-wide state; a second run in the same process with another precision (tests, a
        # notebook) is refused. In a single process nothing else depends on that state, so start it afresh.
        if AcceleratorState().num_processes != 1:
            raise
        AcceleratorState._reset_state()
        log.debug("accelerate state reset for mixed precision %s", mixed_precision)
        return Accelerator(mixed_precision=mixed_precision)


def _ensure_applied(model: nn.Module, addon: PruningAddon) -> bool:
    state = getattr(model, STATE_ATTR, None)
    if state is not None and state.addon.students is not addon.students:
        raise ConfigError("another add-on is applied to the model", expected="the add-on being trained, or none",
                          found="a different add-on under model.ppcl", fix="remove_addon(model) first")
    if state is None:
        apply_addon(model, addon, level=None)
    return state is None


def _check_data(data: DistillData, config: DistillConfig) -> None:
    if not callable(getattr(data, "batch", None)):
        raise ConfigError("the data source has no batch(step) method", expected="a DistillData", found=str(data))
    size = getattr(data, "batch_size", None)
    if size is not None and size != config.batch_size:
        raise ConfigError("the data source and the config disagree on the batch size",
                          expected=f"batch_size {config.batch_size} (config)", found=f"{size} (data)",
                          fix="build the data source with the config's batch size")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _log_row(accelerator: Accelerator, out: Path, step: int, window: dict[str, list[float]], lr: float,
             seconds: float) -> None:
    if not accelerator.is_main_process:
        return
    spans = {key: float(np.mean(values)) for key, values in window.items()}
    row = {"step": step, "loss": sum(spans.values()), "spans": spans, "lr": lr, "seconds": round(seconds, 3)}
    with (out / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    rows = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(r + "\n" for r in rows if r and json.loads(r)["step"] <= step))
