"""The add-on manifest ``ppcl_addon.json``: file names, format version, level summaries, student descriptions.

Format (version 1)::

    {"format": "ppcl.pruning_addon", "format_version": 1, "ppcl_version": "0.1.0", "arch": "qwenimage",
     "base_model_class": "QwenImageTransformer2DModel",
     "fingerprint": {...},                    # see ppcl.addon.fingerprint
     "plan": {...},                           # PruningPlan.to_json()
     "levels": [{"name", "replacements", "spans", "description", "blocks": {"before", "after"},
                 "params": {"before", "after", "removed", "removed_fraction"} | null}],
     "students": {"depth_3_5": {"replacement", "kind", "span", "init", "init_block", "block_name", "class",
                                "module", "constructor_config", "constructor_config_complete", "num_params"}},
     "projections": {"text_50_60__in_51": {"replacement", "kind", "part", "class", "module", "shape", "dtype",
                                           "num_params"}},          # format version 2 only
     "provenance": {...}, "metrics": {...}}

Weights live in ``ppcl_addon.safetensors`` under ``"<module key>.<parameter name>"`` (students and projections alike;
a projection's parameters are ``W`` ``(D, D)`` and ``b`` ``(D,)``).

Versions: 1 = depth students only; 2 adds width projections (text runs, FFN blocks). An add-on without projections is
still written as version 1, so older ppcl versions keep reading depth-only add-ons; one with projections is written as
version 2, which an older ppcl refuses with "upgrade ppcl" instead of failing on the unknown replacement kinds.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ppcl.errors import ArtefactError, ConfigError, PPCLError
from ppcl.kinds import kind_of, registered_kinds
from ppcl.logging import get_logger
from ppcl.version import __version__

if TYPE_CHECKING:
    from ppcl.plan import DepthReplacement, PruningPlan, Replacement

ADDON_FILE = "ppcl_addon.json"
WEIGHTS_FILE = "ppcl_addon.safetensors"
CARD_FILE = "README.md"
FORMAT = "ppcl.pruning_addon"
FORMAT_VERSION = 2
"""The newest add-on format version this ppcl reads and writes (see the module docstring)."""
DEPTH_ONLY_FORMAT_VERSION = 1
"""The version written for add-ons without width projections."""

_log = get_logger(__name__)
_JSON_SCALARS = (int, float, str, bool, type(None))


def ppcl_version() -> str:
    """The installed ppcl version string."""
    return __version__


def check_format(manifest: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ArtefactError` unless ``manifest`` is an add-on manifest this ppcl version can read."""
    fmt = manifest.get("format")
    version = manifest.get("format_version")
    if fmt != FORMAT:
        raise ArtefactError(
            f"{where} is not a ppcl add-on manifest",
            expected=f"format {FORMAT!r}",
            found=f"format {fmt!r}",
            fix="pass the folder written by PruningAddon.save_pretrained",
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtefactError(
            f"{where} has no valid format_version",
            expected="an integer format_version",
            found=repr(version),
            fix="re-create the add-on with ppcl",
        )
    if version > FORMAT_VERSION:
        raise ArtefactError(
            f"{where} was written by a newer ppcl",
            expected=f"add-on format_version <= {FORMAT_VERSION} (ppcl {ppcl_version()})",
            found=f"format_version {version} (written by ppcl {manifest.get('ppcl_version', '?')})",
            fix="upgrade ppcl",
        )
    for key, kind in (("plan", dict), ("fingerprint", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtefactError(
                f"{where} field `{key}` is missing or malformed",
                expected=f"a JSON object `{key}`",
                found=type(manifest.get(key)).__name__,
                fix="re-create the add-on with ppcl",
            )


def level_summaries(plan: PruningPlan, config: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Per level: its replacements, block counts before/after and parameter counts when ``config`` allows."""
    out = []
    for lvl in plan.levels:
        removed = plan.removed_blocks(lvl)
        entry: dict[str, Any] = {
            "name": lvl.name,
            "replacements": list(lvl.replacement_ids),
            "spans": [_describe(plan, rep) for rep in plan.replacements_of(lvl) if _is_depth(rep)],
            "width": [width_label(rep) for rep in plan.replacements_of(lvl) if not _is_depth(rep)],
            "description": lvl.description,
            "blocks": {"before": plan.num_blocks, "after": plan.num_blocks - len(removed)},
            "params": None,
        }
        if config:
            try:
                count = plan.param_count(config, lvl)
            except (PPCLError, TypeError, ValueError) as err:
                # Counting needs the diffusers class; a card without counts is still a valid add-on.
                _log.warning("Parameter counts for level %s unavailable: %s", lvl.name, err)
            else:
                entry["params"] = {
                    "before": count.total,
                    "after": count.after,
                    "removed": count.removed,
                    "removed_fraction": count.fraction_removed,
                }
        out.append(entry)
    return out


def _describe(plan: PruningPlan, rep: Any) -> str:
    span = getattr(rep, "span", None)
    return plan.describe(span) if span is not None else rep.id


def _is_depth(rep: Replacement) -> bool:
    return kind_of(rep).owns_student


def width_label(rep: Replacement) -> str:
    """Short human label of a width replacement, e.g. ``"text:50-60 (text run, inclusive [50, 59])"``."""
    return kind_of(rep).label(rep)


def student_entry(plan: PruningPlan, rep: DepthReplacement, student: nn.Module) -> dict[str, Any]:
    """Manifest description of the student of ``rep``."""
    stack, local = plan.layout().locate(rep.init_block)
    names = plan.layout().names
    block_name = f"{names[stack]}.{local}" if names else f"blocks.{rep.init_block}"
    ctor, complete = constructor_config(student)
    return {
        "replacement": rep.id,
        "kind": rep.kind,
        "span": [rep.span.start, rep.span.stop],
        "init": rep.init,
        "init_block": rep.init_block,
        "block_name": block_name,
        "class": type(student).__name__,
        "module": type(student).__module__,
        "constructor_config": ctor,
        "constructor_config_complete": complete,
        "num_params": sum(p.numel() for p in student.parameters()),
    }


def constructor_config(block: nn.Module) -> tuple[dict[str, Any], bool]:
    """Best-effort ``__init__`` arguments of ``block`` read back from same-named attributes.

    Returns the arguments found and whether every argument was found. Informational only: ppcl rebuilds students
    by copying the base model's block, never from this record.
    """
    try:
        params = list(inspect.signature(type(block).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}, False
    found: dict[str, Any] = {}
    complete = True
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(block, param.name, inspect.Parameter.empty)
        if isinstance(value, tuple | list) and all(isinstance(v, _JSON_SCALARS) for v in value):
            found[param.name] = list(value)
        elif isinstance(value, _JSON_SCALARS):
            found[param.name] = value
        else:
            complete = False
    return found, complete


def projection_entry(rep: Replacement, key: str, module: nn.Module) -> dict[str, Any]:
    """Manifest description of the width projection ``key`` of ``rep`` (a ``ResidualLinear``, ``W`` ``(D, D)``)."""
    weight = module.W
    return {
        "replacement": rep.id,
        "kind": rep.kind,
        "part": key.rsplit("__", 1)[-1],
        "class": type(module).__name__,
        "module": type(module).__module__,
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "num_params": sum(p.numel() for p in module.parameters()),
    }


def manifest_version(has_projections: bool) -> int:
    """The format version to write: 1 for depth-only add-ons (readable by older ppcl), 2 with projections."""
    return FORMAT_VERSION if has_projections else DEPTH_ONLY_FORMAT_VERSION


def check_plan_kinds(plan: PruningPlan) -> list[Replacement]:
    """The plan's replacements; a kind no :mod:`ppcl.kinds` module handles raises :class:`ConfigError`."""
    others = [rep for rep in plan.replacements if rep.kind not in registered_kinds()]
    if others:
        raise ConfigError(
            f"The plan has replacement kinds this add-on cannot hold: {sorted({r.kind for r in others})}",
            expected=f"replacement kinds {registered_kinds()}",
            found=str([r.id for r in others]),
            fix="remove those replacements from the plan, or use a ppcl version that supports them",
        )
    return list(plan.replacements)


def depth_replacements(plan: PruningPlan) -> list[DepthReplacement]:
    """The plan's replacements that own a student block (depth), after :func:`check_plan_kinds`, in plan order."""
    return [rep for rep in check_plan_kinds(plan) if kind_of(rep).owns_student]  # type: ignore[misc]
