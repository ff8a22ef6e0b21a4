"""Base-model fingerprints: what an add-on needs to know to refuse a base model it was not made for.

A fingerprint holds the model class, the ArchSpec name, the config (and its hash), the block counts per stack and the
parameter shapes of every block the plan touches. :func:`check_fingerprint` compares two of them field by field and
raises :class:`~ppcl.errors.AddonMismatchError` naming the first field that differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ppcl.addon.blocks import base_named_shapes
from ppcl.arch import get_spec
from ppcl.errors import AddonMismatchError, ArtefactError
from ppcl.io import STORAGE_CONFIG_KEYS, config_hash
from ppcl.logging import get_logger

if TYPE_CHECKING:
    from ppcl.plan import PruningPlan

_log = get_logger(__name__)


def touched_blocks(plan: PruningPlan) -> list[int]:
    """Sorted flat indices of every block any replacement of ``plan`` touches."""
    return sorted({i for rep in plan.replacements for i in rep.blocks()})


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as plain JSON values, without private (``_``-prefixed) or storage entries
    (:data:`ppcl.io.STORAGE_CONFIG_KEYS`: a quantised base is the same base)."""
    public = {k: v for k, v in config.items() if not k.startswith("_") and k not in STORAGE_CONFIG_KEYS}
    return json.loads(json.dumps(public, sort_keys=True, default=str))


def fingerprint_of(model: nn.Module, touched: PruningPlan | Iterable[int] | None = None) -> dict[str, Any]:
    """Fingerprint of a base transformer.

    Args:
        model: a supported diffusers transformer (an add-on may be applied; its students are not looked at).
        touched: a plan (its touched blocks are used) or flat block indices whose parameter shapes are recorded;
            ``None`` records no block shapes.

    Returns:
        ``{"class", "arch", "config", "config_hash", "stack_sizes", "block_shapes"}`` where ``block_shapes`` maps
        ``"<stack attr>.<local index>.<param>"`` to a shape list (adapter layers such as LoRA are seen through).
    """
    from ppcl.plan import PruningPlan

    spec = get_spec(model)
    config = clean_config(dict(getattr(model, "config", {})))
    if touched is None:
        indices: list[int] = []
    elif isinstance(touched, PruningPlan):
        indices = touched_blocks(touched)
    else:
        indices = sorted({int(i) for i in touched})
    shapes: dict[str, list[int]] = {}
    for i in indices:
        name = spec.block_name(model, i)
        shapes.update({f"{name}.{k}": v for k, v in base_named_shapes(spec.block(model, i)).items()})
    return {
        "class": type(model).__name__,
        "arch": spec.name,
        "name_or_path": str(dict(getattr(model, "config", {})).get("_name_or_path", "")),
        "config": config,
        "config_hash": config_hash(config),
        "stack_sizes": spec.stack_sizes(model),
        "block_shapes": shapes,
    }


def check_fingerprint(expected: Mapping[str, Any], found: Mapping[str, Any]) -> None:
    """Raise :class:`AddonMismatchError` for the first field of ``found`` that differs from ``expected``.

    Order: class, arch, stack sizes, config values, block parameter shapes. Config entries present on only one side
    are tolerated (diffusers adds config keys across versions with defaults); a logged warning says which.

    Raises:
        ArtefactError: ``expected`` (read from an add-on) lacks a field or has one of the wrong type: a check that
            would be skipped is an error, not a pass.
    """
    require_complete(expected)
    for field in ("class", "arch", "stack_sizes"):
        if list_or_value(expected.get(field)) != list_or_value(found.get(field)):
            _mismatch(field, expected.get(field), found.get(field))
    if expected.get("config_hash") != found.get("config_hash"):
        _compare_configs(expected.get("config") or {}, found.get("config") or {})
    want, have = expected.get("block_shapes") or {}, found.get("block_shapes") or {}
    # Only the blocks the add-on recorded matter; the base may have been fingerprinted over more blocks.
    for name in sorted(want):
        if name not in have:
            _mismatch(f"block_shapes[{name}]", want[name], "no such parameter")
        if list(want[name]) != list(have[name]):
            _mismatch(f"block_shapes[{name}]", want[name], have[name])
    recorded = _blocks_of(want)
    extra = sorted(n for n in have if _block_of(n) in recorded and n not in want)
    if extra:
        _mismatch(f"block_shapes[{extra[0]}]", "no such parameter", list(have[extra[0]]))


FIELDS: dict[str, type | tuple[type, ...]] = {
    "class": str,
    "arch": str,
    "config": dict,
    "config_hash": str,
    "stack_sizes": list,
    "block_shapes": dict,
}


def require_complete(fingerprint: Mapping[str, Any]) -> None:
    """Raise :class:`ArtefactError` naming the first missing, null or mistyped field of a recorded fingerprint."""
    for field, kind in FIELDS.items():
        value = fingerprint.get(field) if isinstance(fingerprint, Mapping) else None
        if not isinstance(value, kind) or (field == "stack_sizes" and not all(isinstance(s, int) for s in value)):
            raise ArtefactError(
                "the add-on's base-model fingerprint is incomplete",
                expected=f"fingerprint.{field} as a {getattr(kind, '__name__', kind)}",
                found=f"{value!r}"[:80],
                fix="re-create the add-on with ppcl (the manifest was "
                "edited or damaged); the base model cannot be checked without it",
            )


def list_or_value(value: Any) -> Any:
    """Tuples compared as lists (JSON turns one into the other)."""
    return list(value) if isinstance(value, tuple | list) else value


def _block_of(param_name: str) -> str:
    return ".".join(param_name.split(".")[:2])


def _blocks_of(shapes: Mapping[str, Any]) -> set[str]:
    return {_block_of(name) for name in shapes}


def _compare_configs(want: Mapping[str, Any], have: Mapping[str, Any]) -> None:
    differing = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if differing:
        key = differing[0]
        others = f" (and {differing[1:]})" if len(differing) > 1 else ""
        _mismatch(f"config.{key}{others}", want[key], have[key])
    only = sorted(want.keys() ^ have.keys())
    _log.warning(
        "The base config differs from the add-on's only in entries present on one side %s; accepted "
        "(typically a different diffusers version).",
        only,
    )


def _mismatch(field: str, expected: Any, found: Any) -> None:
    raise AddonMismatchError(
        f"The add-on was made for another base model: `{field}` differs",
        expected=f"{field} = {expected!r}",
        found=f"{field} = {found!r}",
        fix="load the add-on onto the base transformer it was trained on (same checkpoint and config)",
    )
