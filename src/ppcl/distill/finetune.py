"""Short end-to-end fine-tune of one level (METHOD.md Stage 3).

The pruned model (add-on active at ``level``) and the teacher (the same model, add-on disabled) see the same noisy
inputs; the loss is the MSE between their outputs, plus optionally ``flow_matching_weight`` × the MSE between the
pruned output and a flow-matching target that the data provides under the batch key :data:`FLOW_TARGET_KEY`
(``(B, ...)`` shaped like the transformer's output, e.g. the velocity ``ε − x0`` for ``x_t = (1 − σ)·x0 + σ·ε``).

Default: only the add-on parameters active at ``level`` train (its depth students and projections), so every level
stays valid on the original base. ``full=True`` also trains the base blocks that survive at ``level``: the result is a
*standalone* model, valid only with those changed base weights. The run then records ``"standalone"`` (with the
level) in the add-on provenance, refreshes the add-on's base fingerprint to the changed base, and writes the merged
model of that level to ``out_dir/merged`` (diffusers ``save_pretrained`` + the width record, see
:func:`ppcl.runtime.save_merged`): use that folder, not the add-on on an original base.
The teacher of a full fine-tune must stay the original model, so a frozen copy of the trained blocks' original weights
is kept and swapped in (pointer swap, no copy per step) for the teacher pass: memory grows by those blocks once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ppcl.addon import PruningAddon, student_key
from ppcl.addon.fingerprint import fingerprint_of
from ppcl.arch import get_spec
from ppcl.distill.data import DistillData
from ppcl.distill.trainer import DistillConfig, TrainingSession
from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.plan import DepthReplacement
from ppcl.runtime import disabled, merge, save_merged, set_level
from ppcl.runtime.width import projection_keys

log = get_logger("distill")

FLOW_TARGET_KEY = "flow_target"
"""Batch key of the optional flow-matching target; it is removed from the batch before the model is called."""
MERGED_DIR = "merged"


def level_modules(addon: PruningAddon, level: str) -> nn.ModuleDict:
    """The add-on modules active at ``level``: depth students and width projections, by their add-on keys."""
    keys: list[str] = []
    for rep in addon.plan.replacements_of(level):
        keys += [student_key(rep.id)] if isinstance(rep, DepthReplacement) else projection_keys(rep)
    return nn.ModuleDict({k: addon.students[k] for k in keys})


def surviving_blocks(model: nn.Module, addon: PruningAddon, level: str) -> dict[str, nn.Module]:
    """``{qualified block name: block}`` of the base blocks that still run at ``level`` (not inside an active depth
    span; a span's first block is replaced by its student)."""
    spec = get_spec(model)
    gone = {i for rep in addon.plan.replacements_of(level) if isinstance(rep, DepthReplacement)
            for i in rep.span.blocks}
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


class FinetuneStep(nn.Module):
    """Output-distillation loss of one batch at ``level``; trained modules are its submodules.

    Loss terms: ``output`` (MSE pruned vs teacher output) and, with ``flow_matching_weight > 0``, ``flow_matching``.

    Args:
        model: the transformer with the add-on applied.
        trained: the add-on modules to train (:func:`level_modules`).
        level: the level the pruned model runs at (left active, so checkpointed blocks recompute as they ran).
        blocks: base blocks trained too (``full=True``), else empty.
        flow_matching_weight: weight of the flow-matching term.
    """

    def __init__(self, model: nn.Module, trained: nn.ModuleDict, level: str, blocks: dict[str, nn.Module],
                 flow_matching_weight: float = 0.0) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.trained = trained
        self.blocks = nn.ModuleDict({k.replace(".", "_"): b for k, b in blocks.items()})
        self.level, self.flow_matching_weight = level, flow_matching_weight
        # Frozen originals of the trained base weights: the teacher must stay the original model.
        self.originals = [(p, p.detach().clone()) for p in self.blocks.parameters()]
        self.measure, self.timing = False, {}

    model: nn.Module

    def forward(self, **batch: Any) -> dict[str, Tensor]:
        """``{term: scalar loss}`` for ``batch`` (transformer kwargs, plus the optional flow target)."""
        target = batch.pop(FLOW_TARGET_KEY, None)
        if self.flow_matching_weight > 0 and target is None:
            raise ConfigError("the flow-matching loss needs targets", expected=f"batches with key {FLOW_TARGET_KEY!r}",
                              found=f"keys {sorted(batch)}", fix="add the targets to the data or set the weight to 0")
        model = self.model
        set_level(model, self.level)
        with torch.no_grad(), disabled(model), _original_weights(self.originals):
            teacher = model(**batch, return_dict=False)[0]
        pruned = model(**batch, return_dict=False)[0]
        losses = {"output": _mse(pruned, teacher)}
        if self.flow_matching_weight > 0:
            losses["flow_matching"] = self.flow_matching_weight * _mse(pruned, target)
        return losses


def finetune(model: nn.Module, addon: PruningAddon, data: DistillData, config: DistillConfig,
             out_dir: str | os.PathLike[str], level: str, full: bool = False, flow_matching_weight: float = 0.0,
             resume: bool = False, stop_at: int | None = None,
             accelerator: Accelerator | None = None) -> PruningAddon:
    """End-to-end output distillation of ``level`` (pruned model vs the same model with the add-on disabled).

    Args:
        model, addon, data, config, out_dir, resume, stop_at, accelerator: as in
            :func:`~ppcl.distill.trainer.distill_depth` (``config.gradient_checkpointing`` turns on the model's own
            checkpointing; ``config.mode`` is ignored).
        level: the level to fine-tune.
        full: also train the base blocks surviving at ``level``; the base ``model`` is changed in place and the
            result is standalone (see the module docstring).
        flow_matching_weight: weight of the optional flow-matching term (needs :data:`FLOW_TARGET_KEY` batches).

    Returns:
        The add-on (trained in place); ``provenance["finetune"]`` records the run.
    """
    addon.plan.level(level)  # raises on an unknown level
    if flow_matching_weight < 0:
        raise ConfigError("negative flow-matching weight", expected=">= 0", found=str(flow_matching_weight))
    trained = level_modules(addon, level)
    blocks = surviving_blocks(model, addon, level) if full else {}
    extra = {f"{name}.{k}": p for name, block in blocks.items() for k, p in block.named_parameters()}
    with TrainingSession(model, addon, data, config, out_dir, resume, accelerator, extra) as session:
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        step = FinetuneStep(model, trained, level, blocks, flow_matching_weight)
        params = list(trained.parameters()) + list(extra.values())
        kind = "FULL (base blocks train too: the result is a standalone model)" if full else "add-on only"
        stats = session.run(step, params, stop_at, "fine-tune", "terms",
                            f"level {level!r}, {kind}, {len(trained)} add-on module(s), {len(blocks)} base block(s)")
    if stats["end"] < config.steps:
        return addon
    out = Path(out_dir)
    addon.metrics["finetune_loss"] = stats["final"]
    if full:
        # Base weights changed: the add-on now belongs to the fine-tuned base only.
        addon.fingerprint = fingerprint_of(model, addon.plan)
        addon.provenance["standalone"] = {"level": level, "merged_model": MERGED_DIR,
                                          "note": "base weights were fine-tuned; use the merged model"}
        if session.accelerator.is_main_process:
            save_merged(merge(model, addon, level), out / MERGED_DIR)
        log.warning("fine-tune: full fine-tune of level %r changed the base weights; the result is STANDALONE "
                    "(merged model at %s), the add-on is no longer valid on the original base", level,
                    out / MERGED_DIR)
    session.finish("finetune", stats, {"method": "PPCL stage 3", "level": level, "standalone": full,
                                       "flow_matching_weight": flow_matching_weight,
                                       "trained": sorted(trained.keys())})
    return addon
