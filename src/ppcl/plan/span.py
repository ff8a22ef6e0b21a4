"""Block ranges on the flat depth axis and how to print them without ambiguity.

A :class:`Span` is a half-open range ``[start, stop)`` of *flat* block indices: the index runs over all block stacks in
execution order (see :mod:`ppcl.arch.spec`), so for FLUX.1 (19 double + 38 single blocks) flat 20 is
``single_transformer_blocks[1]``. The paper writes the same range inclusively as ``[u, v] = [start, stop - 1]``.

Two conventions are in use, so every printed range names its own: code form ``transformer_blocks[3:5]`` (a Python slice
of a real attribute, or ``blocks[3:5]`` for the flat list) and paper form ``[3, 4] (inclusive)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ppcl.errors import ConfigError

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec

FLAT_NAME = "blocks"
"""Name printed for the flat block list, matching ``ArchSpec.blocks(model)``."""


@dataclass(frozen=True, order=True)
class Span:
    """Half-open range ``[start, stop)`` of flat block indices; ordered by ``(start, stop)``.

    Raises:
        ConfigError: the bounds are not integers or the range is empty (``0 <= start < stop`` is required).
    """

    start: int
    stop: int

    def __post_init__(self) -> None:
        for name in ("start", "stop"):
            value = getattr(self, name)
            # bool is an int subclass; True as a block index is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(
                    f"Span {name} must be an integer block index",
                    expected="an int",
                    found=f"{value!r} ({type(value).__name__})",
                )
        if not 0 <= self.start < self.stop:
            raise ConfigError(
                "A span must cover at least one block",
                expected="0 <= start < stop (half-open flat indices, like a Python slice)",
                found=f"start={self.start}, stop={self.stop}",
                fix="for the paper's inclusive [u, v] use Span.from_inclusive(u, v)",
            )

    @classmethod
    def from_inclusive(cls, u: int, v: int) -> Span:
        """The span the paper writes as inclusive ``[u, v]``, i.e. ``Span(u, v + 1)``."""
        if isinstance(v, int) and isinstance(u, int) and v < u:
            raise ConfigError(
                "An inclusive range must not end before it starts",
                expected="u <= v (inclusive flat indices, as in the paper)",
                found=f"[{u}, {v}] (inclusive)",
            )
        return cls(u, v + 1)

    @property
    def inclusive(self) -> tuple[int, int]:
        """``(u, v)``: first and last block, both inclusive (the paper's convention)."""
        return self.start, self.stop - 1

    @property
    def size(self) -> int:
        """Number of blocks in the span."""
        return self.stop - self.start

    @property
    def removed(self) -> int:
        """Blocks a depth replacement of this span removes: all but the one student block."""
        return self.size - 1

    @property
    def blocks(self) -> range:
        """The flat block indices of the span."""
        return range(self.start, self.stop)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.start <= index < self.stop

    def overlaps(self, other: Span) -> bool:
        """Whether the two spans share at least one block."""
        return self.start < other.stop and other.start < self.stop

    def __str__(self) -> str:
        # Without stack knowledge the only honest name is the flat list; `describe` resolves the stack.
        return f"{FLAT_NAME}[{self.start}:{self.stop}]"

    def paper(self) -> str:
        """The paper's notation, e.g. ``"[3, 4] (inclusive)"`` for ``Span(3, 5)``."""
        u, v = self.inclusive
        return f"[{u}, {v}] (inclusive)"


@dataclass(frozen=True)
class BlockLayout:
    """The flat depth axis of one model: stack sizes, stack names and the blocks no span may touch.

    Attributes:
        sizes: number of blocks in each stack, in execution order.
        names: the stacks' attribute names (``"transformer_blocks"``...); ``None`` prints flat ranges only.
        protected: flat indices of protected blocks.
    """

    sizes: tuple[int, ...]
    names: tuple[str, ...] | None = None
    protected: frozenset[int] = frozenset()

    @classmethod
    def of(cls, stack_sizes: Sequence[int], spec: ArchSpec | None = None, protected: Iterable[int] = ()) -> BlockLayout:
        """Layout for ``stack_sizes``, naming the stacks after ``spec`` when its stack count matches."""
        sizes = tuple(int(s) for s in stack_sizes)
        names = tuple(s.attr for s in spec.stacks) if spec is not None and len(spec.stacks) == len(sizes) else None
        return cls(sizes, names, frozenset(protected))

    @property
    def total(self) -> int:
        """Number of flat blocks."""
        return sum(self.sizes)

    def stack_span(self, stack: int) -> Span:
        """The flat span covered by stack number ``stack``."""
        start = sum(self.sizes[:stack])
        return Span(start, start + self.sizes[stack])

    def locate(self, index: int) -> tuple[int, int]:
        """``(stack number, local index)`` of flat block ``index`` (must be in range)."""
        offset = 0
        for stack, size in enumerate(self.sizes):
            if index < offset + size:
                return stack, index - offset
            offset += size
        raise ConfigError(
            f"Block index {index} is out of range", expected=f"a flat index in [0, {self.total})", found=str(index)
        )

    def stacks_of(self, span: Span) -> list[int]:
        """Numbers of the stacks ``span`` touches (one entry for a well-formed depth span)."""
        return [s for s in range(len(self.sizes)) if self.stack_span(s).overlaps(span)] if self.sizes else []

    def describe(self, span: Span) -> str:
        """Code-convention, stack-local name of ``span``.

        Example: flat ``[20, 22)`` of FLUX.1 (19 double blocks) → ``single_transformer_blocks[1:3]``.

        A span crossing stacks prints as one slice per stack joined by ``+``; a span (partly) past the last block or a
        layout without names prints the flat form ``blocks[a:b]``.
        """
        if self.names is None or span.stop > self.total:
            return str(span)
        parts = []
        for stack in self.stacks_of(span):
            whole = self.stack_span(stack)
            lo, hi = max(span.start, whole.start), min(span.stop, whole.stop)
            parts.append(f"{self.names[stack]}[{lo - whole.start}:{hi - whole.start}]")
        return " + ".join(parts)

    def describe_both(self, span: Span) -> str:
        """Both conventions, e.g. ``"transformer_blocks[3:5] = flat [3, 4] (inclusive)"``."""
        return f"{self.describe(span)} = flat {span.paper()}"


def describe(span: Span, spec: ArchSpec | None, stack_sizes: Sequence[int]) -> str:
    """Code-convention, stack-local name of flat ``span`` for a model of ``spec`` with ``stack_sizes`` blocks per stack.

    Example: ``describe(Span(20, 22), FLUX_SPEC, (19, 38)) == "single_transformer_blocks[1:3]"``.
    """
    return BlockLayout.of(stack_sizes, spec).describe(span)
