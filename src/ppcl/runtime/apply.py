"""Plug an add-on into a base transformer in place, switch its levels, and take it out again exactly.

:func:`apply_addon` never renames, removes or copies a base parameter. It

* registers the students as the submodule ``model.ppcl`` (the add-on's own ``nn.ModuleDict``, so ``model.to(...)``
  moves them and training updates land in the add-on);
* makes every block touched by a replacement run a dispatcher (:mod:`ppcl.modules.dispatch`: the block's class is
  swapped for a same-named subclass whose ``forward`` dispatches, so diffusers / accelerate hooks added or removed in
  any order compose with it, and ``torch.compile(fullgraph=True)`` traces it); :func:`remove_addon` swaps it back;
* registers a state-dict post hook that keeps ``ppcl.*`` out of ``model.state_dict()`` (so diffusers'
  ``save_pretrained`` writes a pure base checkpoint) and a load post hook that lets a strict load of a base checkpoint
  ignore the missing ``ppcl.*`` keys.

The dispatcher of flat block ``i`` looks its action up in the active level's precomputed table: the first block of an
active span runs the student with exactly the arguments the block got (keywords on the normal path, positional under
gradient checkpointing); the other blocks of the span return their own stream inputs in their own output order; every
other block runs its original ``forward``; a block touched by an active width replacement (text run, FFN block) runs
:func:`ppcl.modules.width.width_forward` on its occupant (the teacher block, or the student when it starts an active
span) with the add-on's projections. :func:`set_level` only swaps which table is active: O(1), no allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ppcl.addon import PruningAddon
from ppcl.addon.fingerprint import touched_blocks
from ppcl.arch import ArchSpec, get_spec
from ppcl.errors import ConfigError
from ppcl.kinds import check_kinds, kind_of
from ppcl.modules import dispatch
from ppcl.modules.offload import execution_device
from ppcl.modules.width import RunContext
from ppcl.runtime.width import WidthAction, check_width_support, like_input, width_actions

ADDON_ATTR = "ppcl"
"""Name of the submodule holding the students while an add-on is applied."""
STATE_ATTR = "_ppcl_state"
"""Name of the model attribute holding the :class:`RuntimeState`."""


class _Skip:
    """Action of a block inside an active span, after its first block: return the inputs unchanged."""

    def __repr__(self) -> str:
        return "SKIP"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Skip:
        return self  # a singleton: dispatchers compare with `is`


SKIP = _Skip()

Action = nn.Module | _Skip | WidthAction
"""A dispatch action: a student block to run instead, :data:`SKIP`, or a width-modified forward."""


@dataclass(eq=False)
class RuntimeState:
    """What :func:`apply_addon` stored on the model (``model._ppcl_state``).

    Attributes:
        addon: the applied add-on.
        spec: the model's ArchSpec.
        tables: level name (``None`` = original model) → {flat block index → action}; blocks absent run normally.
        active: the active level's table (one of ``tables``' values, never a copy).
        level: the active level's name.
        blocks: flat index → dispatched block.
        handles: the state-dict hooks to remove.
        contexts: text-run id → the :class:`~ppcl.modules.width.RunContext` carrying ``z_a`` within a forward.
        show_keys: ``state_dict()`` includes ``ppcl.*`` while positive (:func:`addon_keys_visible`).
    """

    addon: PruningAddon
    spec: ArchSpec
    tables: dict[str | None, dict[int, Action]]
    active: dict[int, Action]
    level: str | None
    blocks: dict[int, nn.Module] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)
    contexts: dict[str, RunContext] = field(default_factory=dict)
    show_keys: int = 0


def apply_addon(model: nn.Module, addon: PruningAddon, level: str | None = None) -> nn.Module:
    """Install ``addon`` on ``model`` in place and activate ``level`` (``None``: applied but inactive).

    Students are moved to the device of their span's blocks when needed (in place, so optimisers stay valid); their
    dtype is left alone. While applied, ``model.parameters()`` includes the students (under ``ppcl.``), so freeze the
    base with ``model.requires_grad_(False)`` *before* applying, or re-enable ``addon.parameters()`` after.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: an add-on is already applied, ``model`` already has a ``ppcl`` attribute, or ``level`` is unknown.
        AddonMismatchError: ``addon`` was made for another base model (the field that differs is named).
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise ConfigError(
            "An add-on is already applied to this model",
            expected="a model without an add-on",
            found=f"add-on with levels {model._ppcl_state.addon.level_names}",
            fix="switch levels with set_level, or call remove_addon(model) before applying another",
        )
    if hasattr(model, ADDON_ATTR):
        raise ConfigError(
            f"The model already has an attribute `{ADDON_ATTR}`",
            expected=f"no attribute `{ADDON_ATTR}` (the add-on installs its students there)",
            found=type(getattr(model, ADDON_ATTR)).__name__,
            fix="remove or rename that attribute",
        )
    addon.check_base(model)
    spec = get_spec(model)
    contexts: dict[str, RunContext] = {}
    tables = _dispatch_tables(addon, spec, model, contexts)
    if level not in tables:
        addon.plan.level(level)  # type: ignore[arg-type]  # raises the error listing the known levels
    _align_devices(spec, model, addon)
    state = RuntimeState(addon, spec, tables, tables[level], level, contexts=contexts)
    state.blocks = {i: spec.block(model, i) for i in touched_blocks(addon.plan)}
    installed = []
    try:
        for i, block in state.blocks.items():
            dispatch.install(block, _Dispatcher(model, state, i))
            installed.append(block)
    except BaseException:  # a refused block leaves the model as it was: undo only what this call installed
        for block in installed:
            dispatch.uninstall(block)
        raise
    setattr(model, ADDON_ATTR, addon.students)
    state.handles.append(model.register_state_dict_post_hook(_drop_addon_keys))
    state.handles.append(model.register_load_state_dict_post_hook(_ignore_missing_addon_keys))
    setattr(model, STATE_ATTR, state)
    return model


def set_level(model: nn.Module, name: str | None) -> None:
    """Activate level ``name`` of the applied add-on; ``None`` runs the original model. O(1), allocates nothing;
    a switch resets diffusers' stateful caches (what they kept belongs to the previous level).

    Raises:
        ConfigError: no add-on is applied, or ``name`` is not a level of it (the message lists the levels).
    """
    state = runtime_state(model)
    table = state.tables.get(name)
    if table is None:
        raise ConfigError(
            f"The applied add-on has no level {name!r}",
            expected=f"one of {state.addon.level_names} or None (the original model)",
            found=repr(name),
            fix="pick an existing level name",
        )
    if name != state.level:
        _reset_caches(model)
    state.active = table
    state.level = name


def _reset_caches(model: nn.Module) -> None:
    """Forget what diffusers' stateful hooks (FirstBlockCache, TaylorSeer, PAB...) cached: residuals of one level
    are wrong for another, and a cache would otherwise serve them after a switch."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks(recurse=True)


def active_level(model: nn.Module) -> str | None:
    """The active level's name (``None`` when the original model runs or no add-on is applied)."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else state.level


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original model inside the block (the teacher of distillation); the previous level comes back after,
    also on exceptions."""
    previous = runtime_state(model).level
    set_level(model, None)
    try:
        yield model
    finally:
        if getattr(model, STATE_ATTR, None) is not None:
            set_level(model, previous)


def remove_addon(model: nn.Module) -> PruningAddon:
    """Undo :func:`apply_addon` exactly: class ``forward`` restored, ``model.ppcl`` and the hooks gone.

    Returns:
        the add-on that was applied (its students keep their weights, e.g. after training).

    Hooks and wrappers added while the add-on was applied stay, and run the original block after this.

    Raises:
        ConfigError: no add-on is applied.
    """
    state = runtime_state(model)
    for block in state.blocks.values():
        dispatch.uninstall(block)
    for handle in state.handles:
        handle.remove()
    delattr(model, ADDON_ATTR)
    delattr(model, STATE_ATTR)
    return state.addon


def runtime_state(model: nn.Module) -> RuntimeState:
    """The :class:`RuntimeState` of a model with an add-on applied."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConfigError(
            "No add-on is applied to this model",
            expected="a model passed to apply_addon",
            found=type(model).__name__,
            fix="call ppcl.apply_addon(model, addon) first",
        )
    return state


def _dispatch_tables(
    addon: PruningAddon, spec: ArchSpec, model: nn.Module, contexts: dict[str, RunContext]
) -> dict[str | None, dict[int, Action]]:
    reps = {rep.id: rep for rep in check_kinds(addon.plan.replacements)}
    for rep in reps.values():
        if kind_of(rep).owns_student:
            addon.student(rep.id)  # raises when a student is missing
    check_width_support(spec, model, addon.plan)
    tables: dict[str | None, dict[int, Action]] = {None: {}}
    for lvl in addon.plan.levels:
        table: dict[int, Action] = {}
        for rep_id in lvl.replacement_ids:
            kind_of(reps[rep_id]).add_dispatch(reps[rep_id], addon.students, table, SKIP)  # type: ignore[arg-type]
        # Width actions overwrite a span start's student entry: the student then runs in its width mode.
        table.update(width_actions(model, spec, addon.plan, lvl.name, addon.students, table, contexts))
        tables[lvl.name] = table
    return tables


def _align_devices(spec: ArchSpec, model: nn.Module, addon: PruningAddon) -> None:
    # In-place .to keeps the Parameter objects, so an optimiser built on addon.parameters() stays valid.
    for rep in addon.plan.replacements:
        block = spec.block(model, rep.blocks()[0])
        target = next(block.parameters(), None)
        # An offloaded block (accelerate's sequential offload: weights on meta; diffusers' group offloading: on the
        # CPU) computes on its execution device; the students are not offloaded, so they stay there.
        device = execution_device(block) or (None if target is None else target.device)
        for key in kind_of(rep).module_keys(rep):
            if key not in addon.students:
                continue  # a missing student/projection is reported when the dispatch tables are built
            module = addon.students[key]
            current = next(module.parameters(), None)
            if device is not None and current is not None and current.device != device:
                module.to(device)


class _Dispatcher:
    """What a dispatched block runs (:func:`ppcl.modules.dispatch.install`): the active level's action for it.

    A callable object rather than a closure so that ``copy.deepcopy`` of a model with an add-on applied yields a copy
    whose dispatchers point at the copy's own model, state and students.
    """

    def __init__(self, model: nn.Module, state: RuntimeState, index: int) -> None:
        self.model, self.state, self.index = model, state, index

    def __call__(self, block: nn.Module, original: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        action = self.state.active.get(self.index)
        if action is None:
            return original(block, *args, **kwargs)
        if action is SKIP:
            return self.state.spec.passthrough(self.model, self.index, args, kwargs)
        if not torch.compiler.is_compiling():
            _check_not_offloaded(action, self.index)
        if isinstance(action, WidthAction):
            return action(block, args, kwargs, block.__dict__.get(dispatch.COMPILE_ATTR))
        return self._like_inputs(action(*args, **kwargs), args, kwargs)

    def _like_inputs(self, output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A student's output streams in the dtypes of the streams it was given (see
        :func:`~ppcl.runtime.width.like_input`); any other return value is passed on as it is."""
        spec, model, i = self.state.spec, self.model, self.index
        order = spec.output_order(model, i)
        if spec.stack_of(model, i).bare_output and isinstance(output, torch.Tensor):
            return like_input(output, spec.split_inputs(model, i, args, kwargs).get(order[0]))
        if not isinstance(output, tuple) or len(output) != len(order):
            return output
        given = spec.split_inputs(model, i, args, kwargs)
        return tuple(like_input(out, given.get(stream)) for out, stream in zip(output, order, strict=True))

    def __repr__(self) -> str:
        return f"<ppcl dispatcher of flat block {self.index}>"


def _check_not_offloaded(action: nn.Module | WidthAction, index: int) -> None:
    """Refuse an action whose add-on weights accelerate's sequential offload took away (``meta``, no copy kept).

    ``enable_sequential_cpu_offload`` after :func:`apply_addon` keeps the weights ``state_dict()`` lists, and it
    leaves out ``ppcl.*`` (base checkpoints stay pure): the students' and projections' weights are gone, and
    accelerate would fail with a bare ``KeyError``.
    """
    if isinstance(action, WidthAction):
        parts = action.parts
        modules = [action.module, parts.text_in, parts.text_out, *parts.ffn.values()]
    else:
        modules = [action]
    firsts = [next(m.parameters(), None) for m in modules if m is not None]
    if any(p is not None and p.is_meta for p in firsts):
        raise ConfigError(
            f"The add-on's modules for flat block {index} have no weights: they were offloaded after it was applied",
            expected="enable_sequential_cpu_offload() (accelerate's cpu_offload) before apply_addon / load_pipeline",
            found="add-on weights on the meta device, not kept by the offload hooks",
            fix="load the add-on again and apply it after enabling sequential offload (or use "
            "enable_model_cpu_offload / enable_group_offload, which work in either order)",
        )


@contextmanager
def addon_keys_visible(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model.state_dict()`` includes the add-on's ``ppcl.*`` entries (hidden otherwise, so base
    checkpoints stay pure): for libraries that find adapter weights through ``state_dict()``, e.g. peft's LoRA saving
    and loading when a LoRA also targets the students (:func:`ppcl.runtime.lora_state_dict`)."""
    state = runtime_state(model)
    state.show_keys += 1
    try:
        yield model
    finally:
        state.show_keys -= 1


def _drop_addon_keys(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict[str, Any]
) -> None:
    state = getattr(module, STATE_ATTR, None)
    if state is not None and state.show_keys > 0:
        return
    head = f"{prefix}{ADDON_ATTR}."
    for key in [k for k in state_dict if k.startswith(head)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == head[:-1] or k.startswith(head)]:
            del metadata[key]


def _ignore_missing_addon_keys(module: nn.Module, incompatible: Any) -> None:
    # Keys are relative to the module load_state_dict was called on, which may be a parent of this model.
    marker = f".{ADDON_ATTR}."
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if marker not in f".{k}"]
