"""Registry of ArchSpecs, looked up by the model's class name."""

from __future__ import annotations

from torch import nn

from ppcl.arch.spec import ArchSpec
from ppcl.errors import ConfigError, UnsupportedModelError

_REGISTRY: dict[str, ArchSpec] = {}


def register_spec(spec: ArchSpec, *, replace: bool = False) -> None:
    """Make ``spec`` the spec of every model whose class (or a base class) is named ``spec.model_class_name``."""
    if spec.model_class_name in _REGISTRY and not replace:
        raise ConfigError(
            f"An ArchSpec for {spec.model_class_name} is already registered",
            expected="one spec per model class",
            found=_REGISTRY[spec.model_class_name].name,
            fix="pass replace=True to override it",
        )
    _REGISTRY[spec.model_class_name] = spec


def supported_classes() -> tuple[str, ...]:
    """Class names that have a registered ArchSpec."""
    return tuple(sorted(_REGISTRY))


def get_spec(model_or_class: nn.Module | type) -> ArchSpec:
    """The ArchSpec of a model instance or class.

    Matching is by class name along the MRO, so subclasses of a supported diffusers class are supported too and
    looking a spec up never imports diffusers.

    Raises:
        UnsupportedModelError: no spec is registered for the class or any of its bases.
    """
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for base in cls.__mro__:
        spec = _REGISTRY.get(base.__name__)
        if spec is not None:
            return spec
    raise UnsupportedModelError(
        f"ppcl does not support {cls.__name__}",
        expected=f"one of {', '.join(supported_classes())}",
        found=f"{cls.__module__}.{cls.__qualname__}",
        fix="pass the pipeline's transformer of a supported model, or register an ArchSpec with "
        "ppcl.arch.register_spec",
    )


def width_forward_of(block_class_name: str) -> str | None:
    """The width forward a registered stack declares for blocks of this class (``None``: no width kinds)."""
    for spec in _REGISTRY.values():
        for stack in spec.stacks:
            if stack.block_class_name == block_class_name:
                return stack.width_forward
    return None


def width_block_classes() -> tuple[str, ...]:
    """Block classes of registered stacks that declare a width forward."""
    return tuple(sorted({s.block_class_name for spec in _REGISTRY.values() for s in spec.stacks if s.width_forward}))


def spec_by_name(name: str) -> ArchSpec:
    """The registered ArchSpec called ``name`` (``"qwenimage"``, ``"flux"``, ``"sd3"``)."""
    for spec in _REGISTRY.values():
        if spec.name == name:
            return spec
    raise UnsupportedModelError(
        f"Unknown architecture {name!r}",
        expected=f"one of {', '.join(sorted(s.name for s in _REGISTRY.values()))}",
        found=repr(name),
    )
