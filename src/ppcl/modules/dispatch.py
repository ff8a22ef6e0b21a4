"""Where a dispatched block's ``forward`` lives: in a class, so that hooks composing on ``module.forward`` keep it.

diffusers' hook registry (caches, group offload, layerwise casting), accelerate and most wrappers work by saving a
module's current ``forward`` and installing their own as an instance attribute; removing them puts the saved one
back. ppcl's dispatch therefore is not an instance ``forward``: :func:`install` swaps the block's class for a
subclass (same name, same signature) whose ``forward`` looks the block's action up and otherwise runs the original
class's ``forward``. A hook added later wraps that class ``forward``, a hook removed later restores it, and
``remove_addon`` swaps the class back: every order of applying and removing composes.

A hook registered *before* :func:`install` saved the original class's bound ``forward``; its innermost saved
reference (diffusers' first hook, accelerate's ``_old_forward``) is re-pointed at the dispatching class and restored
by :func:`uninstall`. A block whose instance ``forward`` was replaced by anything else cannot be dispatched beneath
it, and is refused.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable, Hashable
from typing import Any

from torch import nn

from ppcl.errors import ConfigError

DISPATCH_ATTR = "_ppcl_dispatch"
"""Instance attribute of a dispatched block: the callable ``(block, original_forward, args, kwargs) -> output`` it
runs."""
COMPILE_ATTR = "_ppcl_compile_options"
"""Instance attribute of a dispatched block compiled regionally: the ``(args, kwargs)`` of its ``compile`` call."""
_REPOINTED_ATTR = "_ppcl_repointed"
_BASE_ATTR = "_ppcl_base_class"
_CLASSES: dict[type, type] = {}


def dispatching_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The subclass of block class ``cls`` whose ``forward`` runs the block's dispatch (one per class, cached).

    Its name, qualified name, module and ``forward`` signature are ``cls``'s, so ArchSpec validation, ``isinstance``
    and ``inspect.signature(type(block).forward)`` see the diffusers block.
    """
    sub = _CLASSES.get(cls)
    if sub is not None:
        return sub
    original = cls.forward

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        options = self.__dict__.get(COMPILE_ATTR)
        run = original if options is None else compiled_function(original, options)
        dispatch = self.__dict__.get(DISPATCH_ATTR)
        if dispatch is None:  # removed while a wrapper still holds this forward: the block is plain again
            return run(self, *args, **kwargs)
        return dispatch(self, run, args, kwargs)

    def compile(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        """Regional compilation (``model.compile_repeated_blocks``, ``block.compile``) of a dispatched block.

        ``nn.Module.compile`` would compile the whole call, dispatch included: every dispatched block at every level
        would then be its own graph, all counted against one code object, so torch's recompile limit (8) is hit
        (``fullgraph=True`` fails, otherwise the rest runs eagerly). Instead the dispatch stays eager and what it
        runs is compiled: the block's own ``forward`` (one graph for all blocks of the class) here, students by their
        own ``compile`` (they are plain blocks), width-modified forwards by the dispatcher.
        """
        self.__dict__[COMPILE_ATTR] = (args, kwargs)

    attrs = {"forward": forward, "compile": compile, _BASE_ATTR: cls, "__module__": cls.__module__}
    sub = type(cls.__name__, (cls,), attrs)
    sub.__qualname__ = cls.__qualname__
    _share_block_metadata(cls, sub)
    _CLASSES[cls] = sub
    return sub


_COMPILED: dict[tuple[Any, ...], Any] = {}


def compiled_function(
    function: Callable[..., Any], options: tuple[tuple[Any, ...], dict[str, Any]], variant: Hashable = None
) -> Any:
    """``torch.compile(function, *args, **kwargs)`` for ``options = (args, kwargs)``, made once per function, options
    and ``variant``.

    torch keeps a function's graphs, and counts its recompiles (limit 8), per code object. Callers that know their
    calls fall into a few kinds that each need their own graph (a width-modified block's mode) pass the kind as
    ``variant``: each variant compiles a copy of ``function`` with its own code object, so many kinds never add up
    to the limit.
    """
    args, kwargs = options
    key = (function, variant, repr(args), repr(sorted(kwargs.items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        import torch

        target = function if variant is None else _own_code(function)
        compiled = _COMPILED[key] = torch.compile(target, *args, **kwargs)
    return compiled


def _own_code(function: Any) -> Any:
    """A copy of plain function ``function`` with a code object of its own (equal, not identical)."""
    clone = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    clone.__qualname__, clone.__doc__, clone.__module__ = function.__qualname__, function.__doc__, function.__module__
    return clone


def _share_block_metadata(cls: type, sub: type) -> None:
    """diffusers' caches (FirstBlockCache, TaylorSeer...) look a block's I/O metadata up by its exact class: register
    the dispatching subclass with a copy of ``cls``'s (registering sets the entry's ``_cls``)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # a diffusers without the registry has no caches that need it
        return
    try:
        metadata = TransformerBlockRegistry.get(cls)
    except ValueError:  # diffusers has no metadata for this block class: its caches refuse it either way
        return
    TransformerBlockRegistry.register(sub, copy.copy(metadata))


def install(block: nn.Module, dispatch: Callable[[nn.Module, Callable[..., Any], tuple, dict], Any]) -> None:
    """Make ``block`` run ``dispatch(block, original_forward, args, kwargs)`` on every call, beneath its hooks.

    Raises:
        ConfigError: the block is dispatched already, or its ``forward`` was replaced by something ppcl cannot
            reach beneath (not a diffusers hook or an accelerate hook).
    """
    if _BASE_ATTR in type(block).__dict__:
        raise ConfigError(
            f"{type(block).__name__} already runs a ppcl dispatcher",
            expected="a block without one",
            found=repr(block.__dict__.get(DISPATCH_ATTR)),
            fix="remove the other add-on first",
        )
    cls = type(block)
    if block.__dict__.get("_compiled_call_impl") is not None:
        raise ConfigError(
            f"This {cls.__name__} was compiled on its own (regional compilation) before the add-on was applied",
            expected="apply_addon first, then model.compile_repeated_blocks(...) (or torch.compile the whole model)",
            found="a block with a compiled call (block.compile / compile_repeated_blocks)",
            fix="load the model again, apply the add-on, then compile; the dispatch then stays out of the graphs",
        )
    repoint = _saved_forwards(block, cls)
    block.__class__ = dispatching_class(cls)
    new = types.MethodType(block.__class__.forward, block)
    for owner, attr, _old in repoint:
        setattr(owner, attr, new)
    block.__dict__[DISPATCH_ATTR] = dispatch
    block.__dict__[_REPOINTED_ATTR] = repoint


def uninstall(block: nn.Module) -> None:
    """Undo :func:`install`: the original class, the hooks' saved references restored, no dispatch attribute."""
    base = type(block).__dict__.get(_BASE_ATTR)
    if base is None:
        return
    for owner, attr, old in block.__dict__.pop(_REPOINTED_ATTR, ()):
        setattr(owner, attr, old)
    block.__dict__.pop(DISPATCH_ATTR, None)
    block.__class__ = base
    options = block.__dict__.pop(COMPILE_ATTR, None)
    if options is not None:  # compiled while dispatched: a plain block now, compiled the plain way
        block.compile(*options[0], **options[1])


def detached_copy_memo(block: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo under which a copy of ``block`` (a plain block copy, uninstalled right after)
    does not follow its dispatcher: the dispatcher reaches the whole model (its state, every block, the students),
    which would be copied with it. Empty for a block that is not dispatched."""
    memo: dict[int, Any] = {}
    for module in block.modules():
        dispatcher = module.__dict__.get(DISPATCH_ATTR)
        if dispatcher is not None:
            memo[id(dispatcher)] = None
        repointed = module.__dict__.get(_REPOINTED_ATTR)
        if repointed is not None:  # hook objects whose saved forward was re-pointed: the copy drops its hooks
            memo[id(repointed)] = type(repointed)()
    return memo


def is_dispatched(block: nn.Module) -> bool:
    """Whether ``block`` runs a ppcl dispatch."""
    return _BASE_ATTR in type(block).__dict__


def _saved_forwards(block: nn.Module, cls: type) -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, value)`` of every saved reference to the original bound ``forward`` that hooks installed
    before ppcl call at the bottom of their chain; raises when the instance ``forward`` is something else."""
    if "forward" not in block.__dict__:
        return []
    out: list[tuple[Any, str, Any]] = []
    registry = block.__dict__.get("_diffusers_hook")
    if registry is not None and getattr(registry, "_fn_refs", None):
        first = registry._fn_refs[0]  # the first hook saved the forward it wraps
        for attr in ("original_forward", "forward"):
            if _is_original(getattr(first, attr, None), block, cls):
                out.append((first, attr, getattr(first, attr)))
    if _is_original(block.__dict__.get("_old_forward"), block, cls):  # accelerate's add_hook_to_module
        out.append((block, "_old_forward", block.__dict__["_old_forward"]))
    if not out:
        raise ConfigError(
            f"{cls.__name__}'s forward was replaced by {block.__dict__['forward']!r}",
            expected="a block whose forward is its class's, or wrapped by diffusers or accelerate hooks",
            found=repr(block.__dict__["forward"]),
            fix="apply the add-on before wrapping the block's forward",
        )
    return out


def _is_original(value: Any, block: nn.Module, cls: type) -> bool:
    return getattr(value, "__self__", None) is block and getattr(value, "__func__", None) is cls.forward
