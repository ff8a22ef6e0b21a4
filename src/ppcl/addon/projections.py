"""Width projections of an add-on: build them fresh for a plan, describe them, rebuild them from a manifest.

Every text run and FFN-to-linear replacement of a plan owns residual linear projections
(:class:`~ppcl.modules.projection.ResidualLinear`, ``z ↦ z + z Wᵀ + b`` with ``W`` ``(D, D)``, ``b`` ``(D,)``). They live
in the add-on's ``students`` ``nn.ModuleDict`` next to the depth students, under the keys the runtime looks them up by
(:meth:`ppcl.kinds.Kind.module_keys`): ``text_50_60__in_51`` (``L_j`` of text-pruned block 51), ``text_50_60__out``
(``L_h``), ``ffn_2__image`` / ``ffn_2__text``. The key scheme and the identity initialisation belong to each kind's
module in :mod:`ppcl.kinds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.kinds import block_dim, kind_of
from ppcl.modules.projection import ResidualLinear

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.plan import PruningPlan, Replacement


def width_replacements(plan: PruningPlan) -> list[Replacement]:
    """The plan's width replacements (text runs, FFN-to-linear maps), in plan order."""
    return [rep for rep in plan.replacements if kind_of(rep).is_width]


def expected_projections(plan: PruningPlan) -> dict[str, Replacement]:
    """Projection key → the width replacement owning it, for every projection ``plan`` needs."""
    return {key: rep for rep in width_replacements(plan) for key in kind_of(rep).module_keys(rep)}


def fresh_projections(model: nn.Module, plan: PruningPlan) -> dict[str, nn.Module]:
    """Identity projections (``W = 0``, ``b = 0``; float32, on their block's device) for every width replacement.

    Initialise them afterwards with ``fit_from`` (least squares on calibration statistics) or ``set_map``.
    """
    spec = get_spec(model)
    modules = {
        key: module
        for rep in width_replacements(plan)
        for key, module in kind_of(rep).fresh_modules(model, spec, rep).items()
    }
    for module in modules.values():
        module.requires_grad_(True)
    return modules


def projection_entries(plan: PruningPlan, modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Manifest ``"projections"`` section: per projection key its replacement, kind, part, class, shape and dtype.

    Raises:
        ConfigError: ``modules`` lacks a projection the plan needs (named).
    """
    from ppcl.addon.manifest import projection_entry

    expected = expected_projections(plan)
    missing = sorted(expected.keys() - modules.keys())
    if missing:
        raise ConfigError(
            f"The add-on lacks projections its plan's width replacements need: {few_keys(missing)}",
            expected=f"{len(expected)} projections {few_keys(sorted(expected))}",
            found=f"module keys {few_keys(sorted(modules))}",
            fix="build the add-on with PruningAddon.from_plan(model, plan)",
        )
    return {key: projection_entry(rep, key, modules[key]) for key, rep in expected.items()}


def load_projections(
    spec: ArchSpec, model: nn.Module, plan: PruningPlan, recorded: Any, tensors: Mapping[str, torch.Tensor], where: str
) -> dict[str, nn.Module]:
    """Rebuild the projections the manifest records (weights not loaded yet: the caller checks and loads them).

    Each projection is built from its recorded ``shape`` ``[D, D]`` on the device of its replacement's first block, in
    the dtype of its saved ``W`` (projections keep the precision they were trained in; the residual map is computed in
    the wider of that and the activations' dtype), float32 if the tensor is missing (reported by the caller).

    Args:
        spec, model: the base transformer and its ArchSpec.
        plan: the add-on's plan.
        recorded: the manifest's ``"projections"`` value (``None`` for a version-1 manifest).
        tensors: the loaded safetensors file.
        where: the manifest path, for messages.

    Raises:
        ArtefactError: the recorded projection keys differ from the ones the plan needs (both lists named), or a
            recorded shape is malformed or does not match the base block's width.
    """
    expected = expected_projections(plan)
    recorded = {} if recorded is None else recorded
    if not isinstance(recorded, Mapping):
        raise ArtefactError(
            f"{where} field `projections` is malformed",
            expected="a JSON object",
            found=type(recorded).__name__,
            fix="re-save the add-on with ppcl",
        )
    missing, extra = sorted(expected.keys() - recorded.keys()), sorted(recorded.keys() - expected.keys())
    if missing or extra:
        raise ArtefactError(
            f"{where} records other width projections than its plan needs",
            expected=f"{len(expected)} projections {sorted(expected)[:6]}",
            found=f"missing {few_keys(missing)}, unexpected {few_keys(extra)}",
            fix="re-save the add-on; do not edit the plan of a saved add-on by hand",
        )
    out: dict[str, nn.Module] = {}
    for key, rep in expected.items():
        block = spec.block(model, rep.blocks()[0])
        dim = block_dim(block)
        shape = recorded[key].get("shape") if isinstance(recorded[key], Mapping) else None
        if shape != [dim, dim]:
            raise ArtefactError(
                f"{where} records projection {key!r} with an unusable shape",
                expected=f"shape [{dim}, {dim}] (the token width of block {rep.blocks()[0]})",
                found=f"shape {shape!r}",
                fix="re-save the add-on for this base model",
            )
        saved = tensors.get(f"{key}.W")
        dtype = saved.dtype if saved is not None and saved.is_floating_point() else torch.float32
        module = ResidualLinear(dim, dtype=dtype, device=next(block.parameters()).device)
        out[key] = module
    return out


def few_keys(keys: list[str], limit: int = 5) -> str:
    """``keys`` for a message: at most ``limit`` of them and how many more, or ``"none"``."""
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"
