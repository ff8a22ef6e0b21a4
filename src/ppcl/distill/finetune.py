"""Short end-to-end fine-tune of one level (METHOD.md Stage 3).

The pruned model (add-on active at ``level``) and the teacher (the same model, add-on disabled) see the same noisy
inputs; the loss is the MSE between their outputs, plus optionally ``flow_matching_weight`` × the MSE between the
pruned output and a flow-matching target that the data provides under the batch key :data:`FLOW_TARGET_KEY`
(``(B, ...)`` shaped like the transformer's output, e.g. the velocity ``ε − x0`` for ``x_t = (1 − σ)·x0 + σ·ε``).

The objective (:class:`~ppcl.distill.objective.FinetuneObjective`) can add the guided terms on paired cond/uncond
inputs, train several levels at once, and mix in the pruned model's own sampling states.

Default: only the add-on parameters active at ``level`` and at the objective's other levels train (depth students
and projections), so every level stays valid on the original base. ``full=True`` also trains the base blocks that
survive at ``level``: the result is a *standalone* model, valid only with those changed base weights. The run then records ``"standalone"`` (with the
level) in the add-on provenance, refreshes the add-on's base fingerprint to the changed base, and writes the merged
model of that level to ``out_dir/merged`` (diffusers ``save_pretrained`` + the width record, see
:func:`ppcl.runtime.save_merged`): use that folder, not the add-on on an original base.
The teacher of a full fine-tune must stay the original model, so a frozen copy of the trained blocks' original weights
is kept and swapped in (pointer swap, no copy per step) for the teacher pass: memory grows by those blocks once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ppcl.addon import PruningAddon
from ppcl.addon.fingerprint import fingerprint_of
from ppcl.arch import get_spec
from ppcl.distill.data import DistillData
from ppcl.distill.echo import NO_ECHO, TeacherEcho
from ppcl.distill.objective import FinetuneObjective, euler_to, guided_terms
from ppcl.distill.trainer import DistillConfig, TrainingSession
from ppcl.errors import ConfigError
from ppcl.kinds import kind_of
from ppcl.logging import get_logger
from ppcl.runtime import disabled, merge, save_merged, set_level

log = get_logger("distill")

FLOW_TARGET_KEY = "flow_target"
"""Batch key of the optional flow-matching target; it is removed from the batch before the model is called."""
MERGED_DIR = "merged"


def level_modules(addon: PruningAddon, level: str) -> nn.ModuleDict:
    """The add-on modules active at ``level``: depth students and width projections, by their add-on keys."""
    keys: list[str] = []
    for rep in addon.plan.replacements_of(level):
        keys += kind_of(rep).module_keys(rep)
    return nn.ModuleDict({k: addon.students[k] for k in keys})


def surviving_blocks(model: nn.Module, addon: PruningAddon, level: str) -> dict[str, nn.Module]:
    """``{qualified block name: block}`` of the base blocks that still run at ``level`` (not inside an active depth
    span; a span's first block is replaced by its student)."""
    spec = get_spec(model)
    gone = {i for rep in addon.plan.replacements_of(level) if kind_of(rep).owns_student for i in rep.blocks()}
    return {spec.block_name(model, i): spec.block(model, i) for i in range(spec.num_blocks(model)) if i not in gone}


@contextmanager
def _original_weights(pairs: list[tuple[nn.Parameter, Tensor]]) -> Iterator[None]:
    """Temporarily point trained parameters at their frozen originals (data pointer swap; no grad may flow)."""
    current = [p.data for p, _ in pairs]
    for p, original in pairs:
        p.data = original
    try:
        yield
    finally:
        for (p, _), data in zip(pairs, current, strict=True):
            p.data = data


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.detach().float()).pow(2).mean()


Unconditional = Callable[[dict[str, Any]], dict[str, Any]]
"""Maps a batch to its unconditional twin: same ``x_t`` and timestep, the empty prompt's embedding and mask."""


class FinetuneStep(nn.Module):
    """Output-distillation loss of one batch at one or several levels; trained modules are its submodules.

    Loss terms (:mod:`ppcl.distill.objective`): ``output`` (MSE pruned vs teacher output), with a guidance scale also
    ``guided`` and ``direction`` on paired cond/uncond inputs, and with ``flow_matching_weight > 0``
    ``flow_matching``. With several levels per batch every key is prefixed ``"<level>/"``.

    Args:
        model: the transformer with the add-on applied.
        trained: the add-on modules to train (:func:`level_modules`).
        level: the level the pruned model runs at (left active, so checkpointed blocks recompute as they ran).
        blocks: base blocks trained too (``full=True``), else empty.
        flow_matching_weight: weight of the flow-matching term.
        objective: the terms and levels; default: the plain output MSE at ``level``.
        unconditional: builds a batch's unconditional twin (needed by a guided objective).
    """

    def __init__(
        self,
        model: nn.Module,
        trained: nn.ModuleDict,
        level: str,
        blocks: dict[str, nn.Module],
        flow_matching_weight: float = 0.0,
        objective: FinetuneObjective | None = None,
        unconditional: Unconditional | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.trained = trained
        self.blocks = nn.ModuleDict({k.replace(".", "_"): b for k, b in blocks.items()})
        self.level, self.flow_matching_weight = level, flow_matching_weight
        self.objective = (objective or FinetuneObjective()).validate()
        self.levels = list(dict.fromkeys([level, *self.objective.levels]))
        if self.objective.paired and unconditional is None:
            raise ConfigError(
                "a guided fine-tune needs unconditional twins of the batches",
                expected="a data source with an unconditional(batch) method (the toy data has one)",
                found="none",
                fix="use guidance=None (plain output loss) with this data source",
            )
        self.unconditional = unconditional
        # Frozen originals of the trained base weights: the teacher must stay the original model.
        self.originals = [(p, p.detach().clone()) for p in self.blocks.parameters()]
        self.measure, self.timing, self.micro_index = False, {}, 0
        self.data_index = None  # set by the loop before each call (StepModule)

    model: nn.Module
    echo: TeacherEcho = NO_ECHO  # the trainer sets its own (data echoing)

    def forward(self, **batch: Any) -> dict[str, Tensor]:
        """``{term: scalar loss}`` for ``batch`` (transformer kwargs, plus the optional flow target)."""
        target = batch.pop(FLOW_TARGET_KEY, None)
        if self.flow_matching_weight > 0 and target is None:
            raise ConfigError(
                "the flow-matching loss needs targets",
                expected=f"batches with key {FLOW_TARGET_KEY!r}",
                found=f"keys {sorted(batch)}",
                fix="add the targets to the data or set the weight to 0",
            )
        model, objective = self.model, self.objective
        levels = objective.draw(self.levels, self.micro_index)
        uncond = self.unconditional(batch) if objective.paired and self.unconditional is not None else None
        if objective.on_policy > 0 and uncond is not None:
            batch, uncond = self._on_policy(batch, uncond, levels[-1])
        # Echoed steps (DistillConfig.teacher_reuse) reuse the batch's teacher velocities; on-policy states are the
        # pruned model's own and change every step, so they are never echoed.
        key = getattr(self, "data_index", None) if objective.on_policy == 0 else None
        teacher = self.echo.get(key, lambda: self._teacher(batch, uncond))
        losses: dict[str, Tensor] = {}
        for name in levels:
            set_level(model, name)
            pruned = self._velocities(batch, uncond)
            terms = guided_terms(pruned, teacher, objective)
            if self.flow_matching_weight > 0:
                terms["flow_matching"] = self.flow_matching_weight * _mse(pruned[0], target)
            prefix = f"{name}/" if len(self.levels) > 1 else ""
            losses.update({prefix + k: v for k, v in terms.items()})
        # Left at the last trained level: with one level per batch, checkpointed blocks recompute as they ran.
        return losses

    def _teacher(self, batch: dict[str, Any], uncond: dict[str, Any] | None) -> tuple[Tensor, Tensor | None]:
        """The original model's velocities (add-on off, frozen original weights), as :meth:`_velocities`."""
        with torch.no_grad(), disabled(self.model), _original_weights(self.originals):
            return self._velocities(batch, uncond)

    def _velocities(self, batch: dict[str, Any], uncond: dict[str, Any] | None) -> tuple[Tensor, Tensor | None]:
        """The model's output ``(B, N, C)`` on the batch and (paired) on its unconditional twin."""
        model = self.model
        cond = model(**batch, return_dict=False)[0]
        return cond, None if uncond is None else model(**uncond, return_dict=False)[0]

    @torch.no_grad()
    def _on_policy(
        self, batch: dict[str, Any], uncond: dict[str, Any], level: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The batch with its first ``round(on_policy * B)`` samples' ``x_t`` replaced by the pruned model's own
        guided sampling state at the same ``t`` (flow-matching data: the timestep is ``t`` in [0, 1])."""
        objective, model = self.objective, self.model
        x, t = batch["hidden_states"], batch["timestep"]
        rows = int(round(objective.on_policy * x.shape[0]))
        if rows == 0:
            return batch, uncond
        index = (
            self.micro_index if self.data_index is None else self.data_index
        )  # per process: ranks draw different noise
        gen = torch.Generator().manual_seed(int(np.random.default_rng([objective.seed, index, 11]).integers(0, 2**62)))
        noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        set_level(model, level)

        def predict(state: Tensor, now: Tensor) -> tuple[Tensor, Tensor]:
            c = model(**{**batch, "hidden_states": state, "timestep": now}, return_dict=False)[0]
            u = model(**{**uncond, "hidden_states": state, "timestep": now}, return_dict=False)[0]
            return c, u

        sampled = euler_to(predict, noise, t, objective.on_policy_steps, float(objective.guidance or 0.0))
        mixed = x.clone()
        mixed[:rows] = sampled[:rows].to(x.dtype)
        return {**batch, "hidden_states": mixed}, {**uncond, "hidden_states": mixed}


def _check_levels(
    addon: PruningAddon, levels: list[str], objective: FinetuneObjective, gradient_checkpointing: bool
) -> None:
    for name in levels:
        addon.plan.level(name)  # raises on an unknown level
    if gradient_checkpointing and objective.level_mode == "all" and len(levels) > 1:
        # Backward recomputes checkpointed blocks at the level left active, which would be the last one only.
        raise ConfigError(
            "gradient checkpointing cannot train several levels on one batch",
            expected="level_mode 'draw' (one level per batch) with gradient checkpointing",
            found=f"level_mode 'all' over {levels}",
            fix="use level_mode='draw' or no checkpointing",
        )


def finetune(
    model: nn.Module,
    addon: PruningAddon,
    data: DistillData,
    config: DistillConfig,
    out_dir: str | os.PathLike[str],
    level: str,
    full: bool = False,
    flow_matching_weight: float = 0.0,
    resume: bool = False,
    stop_at: int | None = None,
    accelerator: Accelerator | None = None,
    objective: FinetuneObjective | None = None,
    overwrite: bool = False,
) -> PruningAddon:
    """End-to-end output distillation of ``level`` (pruned model vs the same model with the add-on disabled).

    Args:
        model, addon, data, config, out_dir, resume, stop_at, accelerator, overwrite: as in
            :func:`~ppcl.distill.trainer.distill_depth` (``config.gradient_checkpointing`` turns on the model's own
            checkpointing; ``config.mode`` is ignored).
        level: the level to fine-tune.
        full: also train the base blocks surviving at ``level``; the base ``model`` is changed in place and the
            result is standalone (see the module docstring).
        flow_matching_weight: weight of the optional flow-matching term (needs :data:`FLOW_TARGET_KEY` batches).
        objective: guided terms and the levels trained together (:class:`~ppcl.distill.objective.FinetuneObjective`);
            default: the plain output MSE at ``level``. Every level's add-on modules train.

    Returns:
        The add-on (trained in place); ``provenance["finetune"]`` records the run.
    """
    objective = (objective or FinetuneObjective()).validate()
    levels = list(dict.fromkeys([level, *objective.levels]))
    _check_levels(addon, levels, objective, config.gradient_checkpointing)
    if flow_matching_weight < 0:
        raise ConfigError("negative flow-matching weight", expected=">= 0", found=str(flow_matching_weight))
    if full and len(levels) > 1:
        raise ConfigError(
            "a full fine-tune trains one level",
            expected="objective.levels empty with full=True",
            found=str(levels),
            fix="fine-tune one level, or train add-on parameters only",
        )
    trained = nn.ModuleDict({k: m for name in levels for k, m in level_modules(addon, name).items()})
    blocks = surviving_blocks(model, addon, level) if full else {}
    extra = {f"{name}.{k}": p for name, block in blocks.items() for k, p in block.named_parameters()}
    with TrainingSession(
        model, addon, data, config, out_dir, resume, accelerator, extra, overwrite=overwrite
    ) as session:
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        step = FinetuneStep(
            model, trained, level, blocks, flow_matching_weight, objective, getattr(data, "unconditional", None)
        )
        params = list(trained.parameters()) + list(extra.values())
        kind = "FULL (base blocks train too: the result is a standalone model)" if full else "add-on only"
        stats = session.run(
            step,
            params,
            stop_at,
            "fine-tune",
            "terms",
            f"level(s) {levels} ({objective.level_mode}), {kind}, {len(trained)} add-on module(s), "
            f"{len(blocks)} base block(s), guidance {objective.guidance}",
        )
    if stats["end"] < config.steps:
        return addon
    out = Path(out_dir)
    addon.metrics["finetune_loss"] = stats["final"]
    if full:
        # Base weights changed: the add-on now belongs to the fine-tuned base only.
        addon.fingerprint = fingerprint_of(model, addon.plan)
        addon.provenance["standalone"] = {
            "level": level,
            "merged_model": MERGED_DIR,
            "note": "base weights were fine-tuned; use the merged model",
        }
        if session.accelerator.is_main_process:
            save_merged(merge(model, addon, level), out / MERGED_DIR)
        log.warning(
            "fine-tune: full fine-tune of level %r changed the base weights; the result is STANDALONE "
            "(merged model at %s), the add-on is no longer valid on the original base",
            level,
            out / MERGED_DIR,
        )
    session.finish(
        "finetune",
        stats,
        {
            "method": "PPCL stage 3",
            "level": level,
            "levels": levels,
            "objective": objective.to_json(),
            "standalone": full,
            "flow_matching_weight": flow_matching_weight,
            "trained": sorted(trained.keys()),
        },
    )
    return addon
