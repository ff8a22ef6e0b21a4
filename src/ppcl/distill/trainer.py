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

import os

from accelerate import Accelerator
from torch import nn

from ppcl.addon import PruningAddon, student_key
from ppcl.distill.config import DistillConfig
from ppcl.distill.data import DistillData
from ppcl.distill.depth import DepthStep, depth_replacements, sequential_level
from ppcl.distill.session import TrainingSession
from ppcl.logging import get_logger

__all__ = ["DistillConfig", "TrainingSession", "distill_depth"]

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
