"""Width replacements (METHOD.md Stage 2): text-stream runs and FFN-to-linear blocks.

Conventions (every printed range names its own):

* :class:`TextRun` ``run`` is a half-open flat :class:`~ppcl.plan.span.Span` ``[a, b + 1)``; the paper writes the same
  run inclusively as ``[a, b]`` (``TextRun.from_inclusive(50, 59)`` is the public run "[50, 59]"). Block ``a`` (the
  *anchor*) runs in full and exports its modulated text features ``z_a`` ``(B, N_txt, D)``; every later block ``j`` of
  the run is text-pruned: its text K/V read ``z_j = z_a + L_j(z_a)``, its text stream passes through, and the last block
  ``b`` returns ``h_b = h + L_h(h)`` where ``h`` is the text it receives (= the anchor's text output, passed through).
* ``skip``: flat blocks inside ``(a, b)`` that a depth span of the same level removes. The paper: "depth-removed layers
  inside a run are skipped". They are listed explicitly because a replacement's parameter count must not depend on
  the other replacements of a level; a level combining a run with depth spans must list exactly the depth-removed
  blocks inside the run (checked pairwise by :meth:`TextRun.conflicts_with` and, for the converse, by
  :func:`check_level_width`). Depth *students* inside a run (span starts) are text-pruned like any block.
* :class:`FFNLinear` replaces the second half (norm2 → modulate → FFN → gate → residual) of one block by ``g + L(g)``
  per listed stream; the second half of that stream's modulation output is no longer computed (nor counted).

Text runs live inside one dual-stream stack (FLUX.1 single blocks have no separate text weights). FFNLinear needs a
separate FFN, so FLUX.1 single blocks are refused, by decision: a single block computes
``x + gate ⊙ proj_out([attn(x̂), gelu(proj_mlp(x̂))])`` with ``x̂`` the modulated norm of ``x``; attention and MLP run in
*parallel* on the same input and share one gate and one output projection, so there is no hidden state ``g`` after an
attention residual and "second half → ``g + L(g)``" does not exist. (In FLUX.1-dev the MLP part, ``proj_mlp`` plus the
MLP columns of ``proj_out``, is 75.5M of the block's 141.6M parameters.) The nearest sound variant, a linear map of
``x̂`` in place of the MLP branch inside the gated sum, is a different approximation that the report's FFN fit (of
``g`` → second-half output) does not measure; it would need its own probe target before it could be selected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ppcl.errors import ArtefactError, ConfigError
from ppcl.plan import _json
from ppcl.plan.replacements import (
    DepthReplacement,
    Issue,
    Replacement,
    register_replacement,
)
from ppcl.plan.span import BlockLayout, Span

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.plan.count import ParamTable
    from ppcl.plan.plan import Level, PruningPlan

_WIDTH_STREAMS: tuple[str, ...] = ("image", "text")


def _stack_spec(layout: BlockLayout, index: int) -> tuple[ArchSpec | None, int]:
    """The ArchSpec whose stack names match ``layout`` (None if unknown) and the stack number of flat ``index``."""
    from ppcl.arch.registry import _REGISTRY

    stack, _ = layout.locate(index)
    if layout.names is None:
        return None, stack
    for spec in _REGISTRY.values():
        if tuple(s.attr for s in spec.stacks) == layout.names:
            return spec, stack
    return None, stack


def _block_prefix(table: ParamTable, index: int) -> str:
    return table.block_names[index]


def _sub_params(table: ParamTable, index: int, names: Sequence[str]) -> int:
    prefix = _block_prefix(table, index)
    return sum(table.module_params.get(f"{prefix}.{n}", 0) for n in names)


def _dim(table: ParamTable, index: int) -> int:
    """Token width ``D`` of flat block ``index``, read from its text key projection (``D × D`` weight + ``D`` bias in
    every supported dual-stream block); the projections and the modulation rows are sized by it."""
    n_params = table.module_params.get(f"{_block_prefix(table, index)}.attn.add_k_proj", 0)
    d = int(((1 + 4 * n_params) ** 0.5 - 1) / 2)
    for cand in (d - 1, d, d + 1):
        if cand > 0 and cand * cand + cand == n_params:
            return cand
    raise ConfigError(
        f"Cannot read the token width of block {index}",
        expected="a D×D text key projection with bias",
        found=f"{n_params} parameters in attn.add_k_proj",
    )


@register_replacement
@dataclass(frozen=True)
class TextRun(Replacement):
    """Text-stream pruning on the flat run ``run`` (half-open; the paper's inclusive ``[a, b]`` is ``[a, b + 1)``).

    Attributes:
        run: half-open flat span ``[a, b + 1)``, at least 2 blocks, inside one dual-stream stack.
        skip: depth-removed flat blocks strictly inside the run (see the module docstring).
        id: stable name; defaults to ``"text:<a>-<b+1>"`` (half-open bounds).
    """

    kind: ClassVar[str] = "text_run"

    run: Span
    skip: tuple[int, ...] = ()
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.run, Span):
            raise ConfigError(
                "A text run needs a Span",
                expected="a ppcl.plan.Span",
                found=type(self.run).__name__,
                fix="use TextRun(Span(a, b + 1)) or TextRun.from_inclusive(a, b)",
            )
        object.__setattr__(self, "skip", tuple(sorted({int(i) for i in self.skip})))
        if not self.id:
            object.__setattr__(self, "id", f"text:{self.run.start}-{self.run.stop}")

    @classmethod
    def from_inclusive(cls, a: int, b: int, skip: Sequence[int] = (), replacement_id: str = "") -> TextRun:
        """The run the paper writes inclusively as ``[a, b]``."""
        return cls(Span.from_inclusive(a, b), tuple(skip), replacement_id)

    @property
    def anchor(self) -> int:
        """Flat index ``a`` of the full block whose modulated text features feed the run."""
        return self.run.start

    @property
    def last(self) -> int:
        """Flat index ``b`` (inclusive) of the block that emits ``h_b = h + L_h(h)``."""
        return self.run.stop - 1

    def pruned_blocks(self) -> tuple[int, ...]:
        """Flat indices of the text-pruned blocks: ``(a, b]`` without :attr:`skip`."""
        return tuple(j for j in range(self.run.start + 1, self.run.stop) if j not in self.skip)

    def blocks(self) -> tuple[int, ...]:
        return tuple(self.run.blocks)

    def removed_blocks(self) -> tuple[int, ...]:
        return ()

    def removed_params(self, table: ParamTable) -> int:
        from ppcl.arch import spec_by_name

        targets = spec_by_name(_arch_of(table)).stacks[_stack_number(table, self.anchor)].width
        d = _dim(table, self.anchor)
        removed = 0
        for j in self.pruned_blocks():
            present = [n for n in targets.text if f"{_block_prefix(table, j)}.{n}" in table.module_params]
            removed += _sub_params(table, j, [n for n in present if n not in targets.text_kv])
        # One L_j (D×D + D) per pruned block, plus one L_h per run.
        return removed - (len(self.pruned_blocks()) + 1) * (d * d + d)

    def issues(self, layout: BlockLayout) -> list[Issue]:
        found = layout.describe_both(self.run)
        if self.run.stop > layout.total:
            return [
                Issue(
                    "runs past the last block",
                    f"a run inside flat blocks [0, {layout.total})",
                    found,
                    "shorten the run or check the plan was made for this model",
                )
            ]
        issues = []
        if self.run.size < 2:
            issues.append(
                Issue(
                    "covers a single block, so it prunes nothing",
                    "a run of at least 2 blocks (inclusive [a, b] with b > a)",
                    found,
                    "extend the run or delete it",
                )
            )
        if len(layout.stacks_of(self.run)) > 1:
            issues.append(
                Issue(
                    "crosses a block-stack boundary",
                    "a run inside one stack",
                    found,
                    "split the run at the stack boundary",
                )
            )
        else:
            spec, stack = _stack_spec(layout, self.run.start)
            if spec is not None and not spec.stacks[stack].dual_stream:
                issues.append(
                    Issue(
                        "lies in a single-stream stack",
                        "a run inside a dual-stream stack (separate text weights)",
                        found,
                        "move the run to the dual-stream blocks",
                    )
                )
        bad = [j for j in self.skip if not self.run.start < j < self.last]
        if bad:
            issues.append(
                Issue(
                    f"skips blocks {bad} that are not strictly inside the run",
                    "skip ⊂ (a, b) (the anchor and the last block must run)",
                    found,
                    "fix `skip` or move the run's ends",
                )
            )
        return issues

    def conflicts_with(self, other: Replacement) -> bool:
        if isinstance(other, TextRun):
            return self.run.overlaps(other.run)
        if isinstance(other, DepthReplacement):
            gone = set(other.removed_blocks())
            # A removed anchor/last block, or a removed block inside the run that `skip` does not list, breaks the run.
            return bool(gone & {self.anchor, self.last}) or bool((gone & set(self.run.blocks)) - set(self.skip))
        return False

    def describe(self, layout: BlockLayout | None = None) -> str:
        where = layout.describe_both(self.run) if layout is not None else f"{self.run} = {self.run.paper()}"
        skip = f", skipping depth-removed {list(self.skip)}" if self.skip else ""
        return (
            f"{self.id}: text-stream run {where}: anchor {self.anchor}, text-pruned {list(self.pruned_blocks())}{skip}"
        )

    def fields_json(self) -> dict[str, Any]:
        a, b = self.run.inclusive
        return {"start": self.run.start, "stop": self.run.stop, "inclusive": [a, b], "skip": list(self.skip)}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], replacement_id: str | None, where: str) -> TextRun:
        span = Span(_json.require(data, "start", int, where), _json.require(data, "stop", int, where))
        inclusive = _json.optional(data, "inclusive", list, where, [])
        if inclusive and list(span.inclusive) != inclusive:
            raise ArtefactError(
                f"Plan fields `{where}.start/stop` and `{where}.inclusive` disagree",
                expected=f"inclusive {list(span.inclusive)}",
                found=f"inclusive {inclusive}",
                fix="edit both, or delete `inclusive`",
            )
        skip = _json.optional(data, "skip", list, where, [])
        return cls(
            span, tuple(_json.check(s, int, f"{where}.skip[{i}]") for i, s in enumerate(skip)), replacement_id or ""
        )


@register_replacement
@dataclass(frozen=True)
class FFNLinear(Replacement):
    """The second half of flat block ``block`` becomes ``g + L(g)`` on ``streams``.

    Attributes:
        block: flat block index.
        streams: ``("image",)`` or ``("image", "text")`` (text only where the block's text stream is not pruned).
        id: defaults to ``"ffn:<block>"``.
    """

    kind: ClassVar[str] = "ffn_linear"

    block: int
    streams: tuple[str, ...] = ("image", "text")
    id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", tuple(s for s in _WIDTH_STREAMS if s in set(self.streams)))
        if not self.streams:
            raise ConfigError(
                f"FFN replacement of block {self.block} names no stream",
                expected=f"a subset of {_WIDTH_STREAMS}",
                found="()",
            )
        if not self.id:
            object.__setattr__(self, "id", f"ffn:{self.block}")

    def blocks(self) -> tuple[int, ...]:
        return (self.block,)

    def removed_blocks(self) -> tuple[int, ...]:
        return ()

    def removed_params(self, table: ParamTable) -> int:
        from ppcl.arch import spec_by_name

        targets = spec_by_name(_arch_of(table)).stacks[_stack_number(table, self.block)].width
        removed = 0
        for stream in self.streams:
            ffn = dict(targets.ffn).get(stream)
            if ffn is None or f"{_block_prefix(table, self.block)}.{ffn}" not in table.module_params:
                continue  # the runtime refuses such a stream (no FFN to replace), see check_width_support
            d = _dim(table, self.block)
            # The FFN goes, the shift/scale/gate rows of the second half go, one residual linear map comes in.
            removed += _sub_params(table, self.block, [ffn]) + 3 * (d * d + d) - (d * d + d)
        return removed

    def issues(self, layout: BlockLayout) -> list[Issue]:
        if not 0 <= self.block < layout.total:
            return [Issue("is out of range", f"a flat block in [0, {layout.total})", str(self.block), "fix `block`")]
        spec, stack = _stack_spec(layout, self.block)
        if spec is not None and not spec.stacks[stack].width.ffn:
            return [
                Issue(
                    "targets a block without a separate FFN",
                    "a block with a feed-forward second half",
                    f"flat block {self.block} ({layout.names[stack] if layout.names else 'blocks'})",
                    "FLUX.1 single blocks fuse their MLP into proj_out; pick a double-stream block",
                )
            ]
        return []

    def conflicts_with(self, other: Replacement) -> bool:
        if isinstance(other, FFNLinear):
            return other.block == self.block
        if isinstance(other, DepthReplacement):
            return self.block in other.removed_blocks()
        if isinstance(other, TextRun):
            return "text" in self.streams and self.block in other.pruned_blocks()
        return False

    def describe(self, layout: BlockLayout | None = None) -> str:
        where = layout.describe(Span(self.block, self.block + 1)) if layout is not None else f"blocks[{self.block}]"
        return f"{self.id}: FFN → residual linear at {where} (flat {self.block}), streams {list(self.streams)}"

    def fields_json(self) -> dict[str, Any]:
        return {"block": self.block, "streams": list(self.streams)}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], replacement_id: str | None, where: str) -> FFNLinear:
        streams = _json.optional(data, "streams", list, where, list(_WIDTH_STREAMS))
        return cls(
            _json.require(data, "block", int, where),
            tuple(_json.check(s, str, f"{where}.streams[{i}]") for i, s in enumerate(streams)),
            replacement_id or "",
        )


def _arch_of(table: ParamTable) -> str:
    from ppcl.arch import get_spec
    from ppcl.plan.count import resolve_model_class

    return get_spec(resolve_model_class(table.model_class)).name


def _stack_number(table: ParamTable, index: int) -> int:
    return BlockLayout(table.stack_sizes).locate(index)[0]


def check_level_width(plan: PruningPlan, level: Level | str) -> None:
    """The level-wide rule pairwise checks cannot see: every ``skip`` block of an active text run is removed by an
    active depth span (otherwise a full block would update the text stream in the middle of the run).

    Raises:
        ConfigError: naming the run, the level and the blocks.
    """
    lvl = plan.level(level) if isinstance(level, str) else level
    reps = plan.replacements_of(lvl)
    gone = {i for rep in reps if isinstance(rep, DepthReplacement) for i in rep.removed_blocks()}
    for rep in reps:
        if isinstance(rep, TextRun) and set(rep.skip) - gone:
            raise ConfigError(
                f"Text run {rep.id} skips blocks no depth span of level {lvl.name} removes",
                expected=f"skip ⊆ depth-removed blocks {sorted(gone & set(rep.run.blocks))}",
                found=f"skip {list(rep.skip)}",
                fix="use a text run whose `skip` matches this level's depth spans",
            )
