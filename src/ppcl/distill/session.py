"""The stage-independent part of a training run (depth, width, fine-tune): :class:`TrainingSession`.

Layout of ``out_dir`` and the rules for an existing one: :mod:`ppcl.distill.run_folder`. One stage's optimisation:
:class:`~ppcl.distill.stage_run.StageRun`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.distill.checkpoint import (
    check_distributed,
    check_shardable,
    checkpoint_bytes,
    make_accelerator,
    preflight,
)
from ppcl.distill.config import DistillConfig
from ppcl.distill.data import DistillData
from ppcl.distill.precision import MasterWeights, autocast_dtype, base_dtype, precision_record
from ppcl.distill.run_folder import ADDON_DIR, check_lock, check_run_folder, claim_run_folder, release_lock
from ppcl.distill.sharding import SessionShards
from ppcl.distill.stage_run import StageRun
from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.runtime import ADDON_ATTR, STATE_ATTR, active_level, apply_addon, remove_addon, set_level

if TYPE_CHECKING:
    from typing_extensions import Self

    from ppcl.distill.step_module import StepModule

log = get_logger("distill")


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
        match = getattr(data, "match_model", None)
        if callable(match):
            match(model)
        self.extra = dict(extra or {})
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise ConfigError(
                "fp16 mixed precision needs a GPU", expected="bf16 or no on CPU", found="fp16", fix="use bf16"
            )
        # Read before anything is upcast (a full fine-tune trains base blocks): the dtype the base runs in.
        self.base_dtype = base_dtype(model, skip=ADDON_ATTR)
        self.mixed_precision = str(getattr(self.accelerator, "mixed_precision", config.mixed_precision))
        self.autocast_dtype = autocast_dtype(self.base_dtype, self.mixed_precision)
        self.masters = MasterWeights(())  # the trained parameters' float32 masters, made by run()
        # What entering changed on the model, for __exit__ to undo (set by _enter / _enter_sharded).
        self.applied_here, self.level_before, self.checkpointing_before = False, None, False
        self.reapply: str | None | bool = False  # sharded: the level to re-apply the add-on at (False: none)
        self.frozen: dict[str, bool] = {}

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
        step_module: StepModule,
        params: list[nn.Parameter],
        stop_at: int | None,
        stage: str,
        terms_key: str,
        what: str,
    ) -> dict[str, Any]:
        """Optimise ``params`` (AdamW + schedule) on the summed losses of ``step_module(**batch)``
        (:class:`~ppcl.distill.stage_run.StageRun`); returns its stats: ``{"final": {term: loss}, "end": last step,
        "elapsed", "seconds_per_step", "teacher_ratio", "stage", "resume_changes"}``."""
        for p in params:
            p.requires_grad_(True)
        # Before loading a checkpoint (its float32 masters load exactly) and before sharding (twins share storage);
        # __exit__ puts every parameter back in its dtype.
        self.masters = MasterWeights(params)
        return StageRun(self, step_module, params, stage, terms_key, what).execute(stop_at)

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
            **({"resumed_with_changes": stats["resume_changes"]} if stats.get("resume_changes") else {}),
        }
        if self.accelerator.is_main_process:
            self.addon.save_pretrained(self.out / ADDON_DIR, overwrite=True)  # atomic by itself; the run owns it
        self.accelerator.wait_for_everyone()
        log.info(
            "%s: done in %.1f s, final loss %.5f; add-on at %s",
            stats["stage"],
            stats["elapsed"],
            sum(stats["final"].values()),
            self.out / ADDON_DIR,
        )
