"""Parameter counts of a model and of a plan's levels, computed on the meta device (no weights, no memory).

The model is built from its config with ``torch.device("meta")``, so even the 20B Qwen-Image costs about a second and
no RAM. A level's count replaces each depth span by one student the size of its init block (see
:class:`~ppcl.plan.replacements.DepthReplacement`); other replacement kinds contribute through
:meth:`~ppcl.plan.replacements.Replacement.removed_params`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppcl.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from ppcl.plan.plan import LevelRef, PruningPlan
    from ppcl.plan.replacements import Replacement

_CACHE_SIZE = 16
_CACHE: OrderedDict[tuple[str, str], ParamTable] = OrderedDict()


@dataclass(frozen=True)
class ParamTable:
    """Parameter counts of one model configuration.

    Attributes:
        model_class: the diffusers class name ("" when built from bare per-block counts).
        stack_sizes: blocks per stack.
        total: all parameters of the model.
        per_block: parameters of each flat block.
        block_names: qualified name of each flat block (``"transformer_blocks.3"``).
        module_params: parameters under every module inside the blocks, by qualified name (``"transformer_blocks.3"``,
            ``"transformer_blocks.3.img_mlp"``...), for replacement kinds that remove parts of blocks.
    """

    model_class: str
    stack_sizes: tuple[int, ...]
    total: int
    per_block: tuple[int, ...] = field(repr=False)
    block_names: tuple[str, ...] = field(default=(), repr=False)
    module_params: Mapping[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_per_block(
        cls, per_block: Sequence[int], stack_sizes: Sequence[int], total: int | None = None
    ) -> ParamTable:
        """A table known only by its per-block counts (``total`` defaults to their sum: blocks only)."""
        counts = tuple(int(n) for n in per_block)
        if len(counts) != sum(stack_sizes):
            raise ConfigError(
                "Per-block parameter counts do not match the stack sizes",
                expected=f"{sum(stack_sizes)} counts for stacks {list(stack_sizes)}",
                found=f"{len(counts)} counts",
            )
        return cls("", tuple(stack_sizes), sum(counts) if total is None else int(total), counts)

    @property
    def block_total(self) -> int:
        """Parameters inside all blocks."""
        return sum(self.per_block)


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a base model and, for a level, of its pruned form.

    Attributes:
        model_class: diffusers class name.
        total: parameters of the base model.
        per_block: parameters of each flat block of the base model.
        level: the level counted (``None``: the base model).
        removed: parameters the level removes.
        removed_blocks: flat indices of the blocks the level removes.
    """

    model_class: str
    total: int
    per_block: tuple[int, ...] = field(repr=False)
    level: str | None = None
    removed: int = 0
    removed_blocks: tuple[int, ...] = ()

    @property
    def after(self) -> int:
        """Parameters after pruning (the merged model of the level)."""
        return self.total - self.removed

    @property
    def block_total(self) -> int:
        """Parameters inside all blocks of the base model."""
        return sum(self.per_block)

    @property
    def non_block(self) -> int:
        """Parameters outside the blocks (embedders, norms, output projection)."""
        return self.total - self.block_total

    @property
    def fraction_removed(self) -> float:
        """Share of all parameters removed."""
        return self.removed / self.total if self.total else 0.0

    @property
    def block_fraction_removed(self) -> float:
        """Share of the block parameters removed (the ``fraction`` target of proposals)."""
        return self.removed / self.block_total if self.block_total else 0.0

    @property
    def blocks_after(self) -> int:
        """Number of blocks of the merged model."""
        return len(self.per_block) - len(self.removed_blocks)

    def summary(self) -> str:
        """One line, e.g. ``"level p40: 20.43B → 11.93B parameters (-41.6%), 60 → 35 blocks"``."""
        head = f"level {self.level}" if self.level is not None else self.model_class
        return (
            f"{head}: {human(self.total)} → {human(self.after)} parameters (-{100 * self.fraction_removed:.1f}%), "
            f"{len(self.per_block)} → {self.blocks_after} blocks"
        )


def human(n: float) -> str:
    """``20430401088`` → ``"20.43B"``; ``339831296`` → ``"339.8M"``."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return str(int(n))


def resolve_model_class(model_class_or_name: type | str) -> type[nn.Module]:
    """A diffusers model class from the class itself, its name, or an ArchSpec name (``"qwenimage"``)."""
    if isinstance(model_class_or_name, type):
        return model_class_or_name
    from ppcl.arch import spec_by_name, supported_classes

    name = model_class_or_name
    if name not in supported_classes():
        try:
            name = spec_by_name(name).model_class_name
        except UnsupportedModelError:
            pass
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnsupportedModelError(
            f"{model_class_or_name!r} is not a diffusers model class",
            expected=f"one of {', '.join(supported_classes())} or an architecture name",
            found=repr(model_class_or_name),
        )
    return cls


def param_table(model_class_or_name: type | str, model_config: Mapping[str, Any]) -> ParamTable:
    """Counts of the model ``model_config`` builds, built once on the meta device and cached per (class, config)."""
    from ppcl.arch import get_spec

    cls = resolve_model_class(model_class_or_name)
    spec = get_spec(cls)
    key = (f"{cls.__module__}.{cls.__qualname__}", _config_hash(model_config))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    with torch.device("meta"):
        model = cls.from_config(dict(model_config))
    blocks = spec.blocks(model)
    names = tuple(spec.block_name(model, i) for i in range(len(blocks)))
    module_params = {
        f"{block_name}.{sub}" if sub else block_name: sum(p.numel() for p in module.parameters())
        for block_name, block in zip(names, blocks, strict=True)
        for sub, module in block.named_modules()
    }
    table = ParamTable(
        model_class=cls.__name__,
        stack_sizes=tuple(spec.stack_sizes(model)),
        total=sum(p.numel() for p in model.parameters()),
        per_block=tuple(sum(p.numel() for p in block.parameters()) for block in blocks),
        block_names=names,
        module_params=module_params,
    )
    _CACHE[key] = table
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table


def param_count(
    model_class_or_name: type | str,
    model_config: Mapping[str, Any],
    plan: PruningPlan | None = None,
    level: LevelRef = None,
) -> ParamCount:
    """Parameters of the model ``model_config`` builds and, with ``plan`` and ``level``, of that level's merged model.

    Args:
        model_class_or_name: diffusers class, its name, or an ArchSpec name.
        model_config: the transformer's config (``model.config`` or its ``config.json`` as a dict).
        plan: a plan for this model; its stack sizes must match the config's.
        level: level name (or :class:`~ppcl.plan.plan.Level`) of ``plan``; ``None`` counts the base model only.

    Raises:
        ConfigError: a level without a plan, or a plan made for another architecture or block count.
    """
    table = param_table(model_class_or_name, model_config)
    if plan is None:
        if level is not None:
            raise ConfigError(
                "A level was given without a plan",
                expected="plan=... together with level=...",
                found=f"level={level!r}, plan=None",
            )
        return ParamCount(table.model_class, table.total, table.per_block)
    from ppcl.arch import get_spec

    arch = get_spec(resolve_model_class(model_class_or_name)).name
    if plan.arch != arch or plan.stack_sizes != table.stack_sizes:
        raise ConfigError(
            "The plan was made for another model",
            expected=f"arch {arch!r} with stack sizes {list(table.stack_sizes)} (from the config)",
            found=f"arch {plan.arch!r} with stack sizes {list(plan.stack_sizes)}",
            fix="count with the config of the model the plan was made for",
        )
    replacements = plan.replacements_of(level)
    name = level if isinstance(level, str) or level is None else level.name
    return ParamCount(
        model_class=table.model_class,
        total=table.total,
        per_block=table.per_block,
        level=name,
        removed=sum(rep.removed_params(table) for rep in replacements),
        removed_blocks=tuple(plan.removed_blocks(level)),
    )


def block_param_fraction(table: ParamTable, replacements: Iterable[Replacement]) -> float:
    """Share of ``table``'s block parameters that ``replacements`` remove together."""
    total = table.block_total
    return sum(rep.removed_params(table) for rep in replacements) / total if total else 0.0


def clear_cache() -> None:
    """Forget cached counts (tests, or after registering a changed model class)."""
    _CACHE.clear()


def _config_hash(config: Mapping[str, Any]) -> str:
    # Keys starting with "_" (class name, diffusers version, defaults used) do not change the architecture; tuples and
    # lists print alike, so a config from model.config and one read from config.json hash the same.
    clean = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=repr).encode()).hexdigest()
