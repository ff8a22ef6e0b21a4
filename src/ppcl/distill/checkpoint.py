"""Session and checkpoint plumbing of :class:`~ppcl.distill.trainer.TrainingSession`: accelerator, RNG state, output-folder pre-flight checks,
recovery after a kill (the SIGKILL tests' fault-injection hook is :mod:`ppcl.faults`).

A checkpoint folder is written by :func:`ppcl.io.atomic_folder` (temp sibling, fsync, rename). The rename of an
existing checkpoint goes through a second sibling ``.checkpoint.*.old/x``; a kill between those two renames leaves no
``checkpoint/`` but a complete old one under ``.old/x``, which :func:`recover_checkpoint` puts back.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from ppcl.errors import ArtefactError, ConfigError
from ppcl.logging import get_logger

if TYPE_CHECKING:
    from ppcl.distill.config import DistillConfig

log = get_logger("distill")


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer may touch, as plain tensors/ints/strings (loads with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))


def checkpoint_bytes(params: int) -> int:
    """Upper estimate of one checkpoint's size for ``params`` trained fp32 parameters: weights + AdamW's two moments,
    twice over because the new checkpoint is complete on disk before the old one is removed."""
    return 2 * 3 * 4 * params


def preflight(out: Path, needed_bytes: int) -> None:
    """Fail before any training when ``out`` cannot hold the run: not creatable, not writable, or too little space.

    Raises:
        ArtefactError: naming the folder and what is wrong.
    """
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ArtefactError(
            "cannot use the training output folder",
            expected="a folder (or a path whose parents are folders)",
            found=f"{blocker} is a file",
            fix="choose another output folder",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtefactError(
            "cannot create the training output folder",
            expected="a writable location",
            found=f"{out}: {exc.strerror}",
            fix="choose another output folder",
        ) from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ArtefactError(
            "the training output folder is not writable",
            expected="a writable folder",
            found=str(out),
            fix="fix its permissions or choose another output folder",
        )
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise ArtefactError(
            "not enough free disk space for the checkpoints",
            expected=f">= {needed_bytes / 1e6:.1f} MB free (two checkpoints: weights + AdamW moments)",
            found=f"{free / 1e6:.1f} MB free under {out}",
            fix="free some space or choose another output folder",
        )


def recover_checkpoint(folder: Path) -> None:
    """Put back a complete checkpoint a kill left under ``.<name>.*.old/x`` when ``folder`` itself is missing, and
    drop temp folders of interrupted writes (never complete by construction: they were not renamed)."""
    parent = folder.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{folder.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if not folder.exists():
        for old in reversed(olds):
            if (old / "x").is_dir():
                os.replace(old / "x", folder)
                log.warning("recovered the checkpoint %s from an interrupted swap (%s)", folder, old)
                break
    for stale in [*olds, *parent.glob(f".{folder.name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse DeepSpeed, whose engine the trainer does not drive.

    Under ZeRO the optimiser state is partitioned inside DeepSpeed's engine, which also steps inside ``backward``; the
    trainer's checkpoints (full tensors, resumable under any layout) and its NaN checks would need that engine's own
    checkpoint format. FSDP covers the same need (sharded gradients and optimiser states, plus the teacher): see
    :mod:`ppcl.distill.sharding`.
    """
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind == "DEEPSPEED":
        raise ConfigError(
            "ppcl's trainer does not run under DeepSpeed",
            expected="one process, DDP (MULTI_GPU / MULTI_CPU) or FSDP",
            found=f"accelerate distributed_type {kind}",
            fix="launch with configs/accelerate/fsdp_8gpu.yaml (shards the teacher, the students and "
            "their AdamW states, as ZeRO would) or ddp_8gpu.yaml; docs/scale.md gives the memory of each",
        )


def check_shardable(config: DistillConfig, shardable: bool, kind: str) -> None:
    """Raise unless a sharded session (:mod:`ppcl.distill.sharding`) can run this stage with this config."""
    why = "shard=True" if config.shard else f"accelerate distributed_type {kind}"
    if not shardable:
        raise ConfigError(
            "sharded training (FSDP) covers non-sequential depth distillation only",
            expected="mode 'nonsequential' depth distillation",
            found=f"{why} for this stage",
            fix="run this stage without --shard, under DDP (configs/accelerate/ddp_8gpu.yaml) or on "
            "one GPU; docs/scale.md gives the memory it needs",
        )
    if config.mixed_precision == "fp16":
        raise ConfigError(
            "sharded training does not support fp16",
            expected="mixed precision bf16 or no",
            found=f"fp16 with {why}",
            fix="use --mixed-precision bf16",
        )


def make_accelerator(mixed_precision: str) -> Accelerator:
    """An ``Accelerator`` with this mixed precision (in one process, even after another run used another one).

    Under ``torchrun`` on a machine without CUDA, accelerate only joins the process group (gloo) when told it runs on
    CPU, so that is said here instead of relying on ``ACCELERATE_USE_CPU``."""
    # Some trained modules have parameters a step never uses (a text-pruned student's text stream); DDP must be told,
    # or its second step fails waiting for their gradients. The graph walk this costs is small next to a block.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Accelerator(mixed_precision=mixed_precision, cpu=True, kwargs_handlers=ddp)
    try:
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=ddp)
    except ValueError:
        # accelerate keeps one process-wide state; a second run in the same process with another precision (tests, a
        # notebook) is refused. In a single process nothing else depends on that state, so start it afresh.
        if AcceleratorState().num_processes != 1:
            raise
        AcceleratorState._reset_state()
        log.debug("accelerate state reset for mixed precision %s", mixed_precision)
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=ddp)


def not_finite_state(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[str]:
    """The parts of the training state that hold NaN/Inf: ``"parameters"``, ``"gradients"``, ``"optimiser state"``
    (empty when all are finite). A checkpoint of such a state is never written: resuming it could not recover.

    Sharded tensors are checked on their local shard (the caller combines the answers of all processes).
    """

    def finite(t: torch.Tensor) -> bool:
        t = t.to_local() if hasattr(t, "to_local") else t
        return bool(torch.isfinite(t.detach()).all())

    bad = []
    if not all(finite(p) for p in params):
        bad.append("parameters")
    if not all(p.grad is None or finite(p.grad) for p in params):
        bad.append("gradients")
    moments = [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()
    ]
    if not all(finite(v) for v in moments):
        bad.append("optimiser state")
    return bad


def not_finite_anywhere(
    params: list[torch.Tensor], optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> list[str]:
    """:func:`not_finite_state` combined over processes: every process gets a non-empty answer when any has one, so
    all of them stop together (one stopping alone would leave the others waiting in the next collective)."""
    bad = not_finite_state(params, optimizer)
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bool(bad))], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() and not bad:
            bad = ["state of another process"]
    return bad
