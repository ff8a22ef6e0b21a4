"""What a plan replaces: a small tagged union of replacement value objects.

Every replacement has a ``kind`` (its JSON tag) and a stable string ``id`` that levels, add-on weights and the runtime
use to refer to it. Depth pruning is the only kind so far; width pruning adds its kinds (text runs, FFN blocks) by
subclassing :class:`Replacement` and decorating the class with :func:`register_replacement`, without touching plans.

Each kind answers the questions a plan asks generically: which flat blocks it touches (conflicts within a level),
which blocks disappear from a merged model, how many parameters it removes, and what is wrong with it on a given
:class:`~ppcl.plan.span.BlockLayout` (validation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, TypeVar, get_args

from ppcl.errors import ArtefactError, ConfigError
from ppcl.plan import _json
from ppcl.plan.span import BlockLayout, Span

if TYPE_CHECKING:
    from ppcl.plan.count import ParamTable

Init = Literal["first", "middle", "last", "average"]
INITS: tuple[str, ...] = get_args(Init)


class Issue(NamedTuple):
    """One problem of a replacement on a layout, in :class:`~ppcl.errors.PPCLError` terms."""

    what: str
    expected: str
    found: str
    fix: str


class Replacement(ABC):
    """Base of all replacement kinds. Subclasses are frozen dataclasses with an ``id: str`` field."""

    kind: ClassVar[str] = ""
    id: str

    @abstractmethod
    def blocks(self) -> tuple[int, ...]:
        """Flat indices of the teacher blocks this replacement changes."""

    @abstractmethod
    def removed_blocks(self) -> tuple[int, ...]:
        """Flat indices of the blocks a merged model no longer has."""

    @abstractmethod
    def removed_params(self, table: ParamTable) -> int:
        """Parameters removed from the model described by ``table`` (negative if the replacement adds some)."""

    @abstractmethod
    def issues(self, layout: BlockLayout) -> list[Issue]:
        """Everything wrong with this replacement on ``layout`` (empty when valid)."""

    @abstractmethod
    def describe(self, layout: BlockLayout | None = None) -> str:
        """One line for humans; every range printed names its convention."""

    @abstractmethod
    def fields_json(self) -> dict[str, Any]:
        """The kind-specific JSON fields (without ``kind`` and ``id``)."""

    @classmethod
    @abstractmethod
    def from_fields(cls: type[R], data: Mapping[str, Any], replacement_id: str | None, where: str) -> R:
        """Inverse of :meth:`fields_json`; ``where`` is the JSON path used in error messages."""

    def conflicts_with(self, other: Replacement) -> bool:
        """Whether both cannot be active in one level. Default: same kind and a shared block."""
        return other.kind == self.kind and bool(set(self.blocks()) & set(other.blocks()))

    def to_json(self) -> dict[str, Any]:
        """JSON object tagged with ``kind``."""
        return {"kind": self.kind, "id": self.id, **self.fields_json()}


R = TypeVar("R", bound=Replacement)

_KINDS: dict[str, type[Replacement]] = {}


def register_replacement(cls: type[R]) -> type[R]:
    """Class decorator making ``cls`` loadable from JSON under its ``kind`` tag."""
    if not cls.kind:
        raise ConfigError(f"{cls.__name__} has no `kind`", expected="a non-empty ClassVar `kind`", found="''")
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise ConfigError(
            f"Replacement kind {cls.kind!r} is already registered",
            expected="one class per kind",
            found=f"{_KINDS[cls.kind].__name__} and {cls.__name__}",
        )
    _KINDS[cls.kind] = cls
    return cls


def replacement_kinds() -> tuple[str, ...]:
    """The registered ``kind`` tags."""
    return tuple(sorted(_KINDS))


def replacement_from_json(data: Any, where: str = "replacement") -> Replacement:
    """Build the replacement a JSON object describes, dispatching on its ``kind``.

    Raises:
        ArtefactError: the object is malformed (the message names the field by its JSON path).
    """
    obj = _json.object_at(data, where)
    kind = _json.require(obj, "kind", str, where)
    cls = _KINDS.get(kind)
    if cls is None:
        raise ArtefactError(
            f"Plan field `{where}.kind` names an unknown replacement kind",
            expected=f"one of {', '.join(replacement_kinds())}",
            found=repr(kind),
            fix="fix the kind, or use a ppcl version that supports it",
        )
    replacement_id = _json.optional(obj, "id", str, where, "") or None
    try:
        return cls.from_fields(obj, replacement_id, where)
    except ConfigError as err:  # a value object rejected its fields: report it as a malformed file
        raise ArtefactError(
            f"Plan field `{where}` is invalid: {err.what}", expected=err.expected, found=err.found, fix=err.fix
        ) from err


@register_replacement
@dataclass(frozen=True)
class DepthReplacement(Replacement):
    """One student block replaces all blocks of ``span`` (non-sequential depth distillation).

    The student sits at the span's first position: it takes the teacher's input of block ``span.start`` and is trained
    to produce the teacher's output of block ``span.stop - 1``; the other blocks of the span pass their inputs through.

    Attributes:
        span: flat half-open range of the replaced blocks; at least 2 blocks to remove anything.
        init: which teacher block the student is copied from: ``"first"`` (the span's first block, the paper),
            ``"middle"`` (floor((u + v) / 2) with inclusive u, v, the authors' release), ``"last"``, or ``"average"``
            (every weight the mean of the span's blocks' weights, as Amber-Image reports for Qwen-Image; the student
            then sits at, and has the shape of, the span's first block).
        id: stable name; defaults to ``"depth:<start>-<stop>"`` with half-open flat bounds (``depth:3-5`` is the
            paper's [3, 4]).
    """

    kind: ClassVar[str] = "depth"

    span: Span
    init: Init = "first"
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.span, Span):
            raise ConfigError(
                "A depth replacement needs a Span",
                expected="a ppcl.plan.Span",
                found=type(self.span).__name__,
                fix="use Span(start, stop) or Span.from_inclusive(u, v)",
            )
        if self.init not in INITS:
            raise ConfigError(
                f"Unknown student initialisation {self.init!r} for {self.span}",
                expected=f"one of {', '.join(INITS)}",
                found=repr(self.init),
            )
        if not self.id:
            # Frozen dataclass: the default id is derived once, here.
            object.__setattr__(self, "id", f"depth:{self.span.start}-{self.span.stop}")
        if not isinstance(self.id, str):
            raise ConfigError("A replacement id must be a string", expected="a str", found=repr(self.id))

    @property
    def init_block(self) -> int:
        """Flat index of the teacher block the student is copied from (``"average"``: the first block, whose structure
        the averaged student keeps; its weights are the mean over :attr:`init_blocks`)."""
        u, v = self.span.inclusive
        return {"first": u, "middle": (u + v) // 2, "last": v, "average": u}[self.init]

    @property
    def init_blocks(self) -> tuple[int, ...]:
        """Flat indices of the teacher blocks whose weights initialise the student (all of the span for ``average``)."""
        return tuple(self.span.blocks) if self.init == "average" else (self.init_block,)

    def blocks(self) -> tuple[int, ...]:
        return tuple(self.span.blocks)

    def removed_blocks(self) -> tuple[int, ...]:
        # The student occupies the span's first position, so every later block of the span disappears.
        return tuple(self.span.blocks)[1:]

    def removed_params(self, table: ParamTable) -> int:
        # The student has the size of the block it is copied from.
        per_block = table.per_block
        return sum(per_block[i] for i in self.span.blocks) - per_block[self.init_block]

    def issues(self, layout: BlockLayout) -> list[Issue]:
        span, found = self.span, f"{layout.describe_both(self.span)}"
        if span.stop > layout.total:
            return [
                Issue(
                    "runs past the last block",
                    f"a span inside flat blocks [0, {layout.total})",
                    found,
                    "shorten the span or check that the plan was made for this model",
                )
            ]
        issues = []
        if span.size < 2:
            issues.append(
                Issue(
                    "covers a single block, so it removes nothing",
                    "a span of at least 2 blocks",
                    found,
                    "extend the span or delete the replacement",
                )
            )
        stacks = layout.stacks_of(span)
        if len(stacks) > 1:
            issues.append(
                Issue(
                    "crosses a block-stack boundary",
                    "all blocks of the span in one stack (the student is one block of one type)",
                    found,
                    "split the span at the stack boundary into one replacement per stack",
                )
            )
        hit = sorted(layout.protected.intersection(span.blocks))
        if hit:
            issues.append(
                Issue(
                    f"covers protected block(s) {hit}",
                    f"a span avoiding the protected blocks {sorted(layout.protected)}",
                    found,
                    "shrink the span, or lower the plan's protect_first / "
                    "protect_last (SD3's last block is always protected)",
                )
            )
        return issues

    def describe(self, layout: BlockLayout | None = None) -> str:
        where = layout.describe_both(self.span) if layout is not None else f"{self.span} = {self.span.paper()}"
        source = f"blocks {self.span.paper()}" if self.init == "average" else f"block {self.init_block}"
        student = f"1 student (init {self.init}, {source})"
        return f"{self.id}: {where} → {student}, removes {self.span.removed}"

    def fields_json(self) -> dict[str, Any]:
        u, v = self.span.inclusive
        return {"start": self.span.start, "stop": self.span.stop, "inclusive": [u, v], "init": self.init}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], replacement_id: str | None, where: str) -> DepthReplacement:
        init = _json.optional(data, "init", str, where, "first")
        inclusive = _json.optional(data, "inclusive", list, where, [])
        if "start" in data or not inclusive:
            span = Span(_json.require(data, "start", int, where), _json.require(data, "stop", int, where))
        else:
            span = _inclusive_span(inclusive, where)
        if inclusive and _inclusive_span(inclusive, where) != span:
            # Both forms are written for readability; a hand edit of only one of them must not pass silently.
            raise ArtefactError(
                f"Plan fields `{where}.start/stop` and `{where}.inclusive` disagree",
                expected=f"inclusive [start, stop - 1] = {list(span.inclusive)}",
                found=f"inclusive {inclusive}",
                fix="edit both, or delete one of them (start/stop is half-open, inclusive is the paper's [u, v])",
            )
        return cls(span, init, replacement_id or "")  # type: ignore[arg-type]


def _inclusive_span(value: list[Any], where: str) -> Span:
    if len(value) != 2:
        raise ArtefactError(
            f"Plan field `{where}.inclusive` is malformed", expected="[u, v] (two flat indices)", found=repr(value)
        )
    u, v = (_json.check(x, int, f"{where}.inclusive") for x in value)
    return Span.from_inclusive(u, v)
