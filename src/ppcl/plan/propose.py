"""Turn scored contiguous intervals into a PruningPlan with nested levels (the budget rule of METHOD.md, stage 1.2).

Intervals are accepted cheapest-first (lowest score, ties by position) until each target is met; the levels are
prefixes of that one order, so every level contains all cheaper ones, which is also the order in which the pluggable
variants enable intervals. Intervals touching protected blocks, crossing a stack boundary, covering a single block or
overlapping an accepted one are skipped and recorded in the plan's provenance.

The budget guard (METHOD.md, "Beyond the paper") keeps a target from forcing in an interval far worse than the ones
already accepted: such an interval is refused, the order stops there and the levels that needed it undershoot their
targets, with a note saying so. Two targets that end up with the same intervals give one level, not two identical ones.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.plan.count import ParamTable, human
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR, BudgetGuard, Refusal, check_guard
from ppcl.plan.plan import Level, PruningPlan
from ppcl.plan.replacements import INITS, DepthReplacement, Init
from ppcl.plan.span import Span

_log = get_logger(__name__)

TargetKind = Literal["fraction", "params", "blocks"]
TARGET_KINDS: tuple[str, ...] = ("fraction", "params", "blocks")
_TARGET_MEANING = {
    "fraction": "fraction of block parameters removed",
    "params": "number of parameters removed",
    "blocks": "number of blocks removed",
}


class IntervalLike(Protocol):
    """Anything with an inclusive flat range ``[u, v]`` and a ``score`` (lower = cheaper to replace)."""

    @property
    def u(self) -> int: ...

    @property
    def v(self) -> int: ...

    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class _Draft:
    """One target's prefix of the acceptance order, before duplicate levels are dropped."""

    name: str
    target: float
    accepted: tuple[tuple[float, DepthReplacement], ...]
    reached: float
    met: bool


def plan_from_intervals(
    intervals: Iterable[IntervalLike],
    spec_name: str,
    model_class: str,
    stack_sizes: Sequence[int],
    per_block_params: Sequence[int] | None,
    targets: Sequence[float],
    target_kind: TargetKind = "fraction",
    level_names: Sequence[str] | None = None,
    protect_first: int = 2,
    protect_last: int = 2,
    init: Init = "first",
    provenance: Mapping[str, Any] | None = None,
    *,
    guard_factor: float = DEFAULT_GUARD_FACTOR,
    guard_floor: float = DEFAULT_GUARD_FLOOR,
) -> PruningPlan:
    """Select intervals cheapest-first into nested levels, one per target.

    Args:
        intervals: candidates with inclusive flat ``u``, ``v`` and ``score`` (e.g. ``ppcl.analysis`` intervals).
        spec_name: ArchSpec name (``"qwenimage"``...).
        model_class: diffusers class name of the base transformer.
        stack_sizes: blocks per stack of the base model.
        per_block_params: parameters of each flat block; only optional for ``target_kind="blocks"``.
        targets: one per level. ``"fraction"``: share of *block* parameters removed, in (0, 1]; ``"params"``: number
            of parameters removed; ``"blocks"``: number of blocks removed. A span of n blocks replaced by a student
            removes n - 1 blocks and the span's block parameters minus the student's (its init block's).
        target_kind: how ``targets`` are measured.
        level_names: one per target; default ``p25``/``p40`` (fractions), ``b10`` (blocks), ``r8.50B`` (params).
        protect_first: the first this-many flat blocks are never replaced.
        protect_last: the last this-many flat blocks are never replaced (SD3's last block always is protected).
        init: which teacher block initialises each student (``"first"``, ``"middle"``, ``"last"``).
        provenance: extra provenance to record (e.g. the report's path or hash).
        guard_factor: the budget guard (:class:`~ppcl.plan.guard.BudgetGuard`): an interval scoring more than this many times the
            largest accepted score is not forced in to meet a target; 0 (or ``inf``) disables it. Default
            :data:`DEFAULT_GUARD_FACTOR` (10, from the toy teacher's scores and METHOD.md).
        guard_floor: the guard's reference is at least this score (:data:`~ppcl.plan.guard.DEFAULT_GUARD_FLOOR`).

    Returns:
        A validated plan; levels ordered by target, ascending. A target the candidates cannot reach, or can reach
        only through an interval the guard refuses, gets every interval before that point, with a note in
        ``plan.notes`` and the log (target, reached figure, refused interval and its score ratio). A level that would
        hold the same intervals as a smaller one is dropped, also with a note. Each level records its worst and
        cheapest interval score.

    Raises:
        ConfigError: unknown target kind or init, bad targets, names or guard settings, an interval out of range.
    """
    if target_kind not in TARGET_KINDS:
        raise ConfigError(
            f"Unknown target kind {target_kind!r}",
            expected=f"one of {', '.join(TARGET_KINDS)}",
            found=repr(target_kind),
        )
    if init not in INITS:
        raise ConfigError(
            f"Unknown student initialisation {init!r}", expected=f"one of {', '.join(INITS)}", found=repr(init)
        )
    guard = check_guard(guard_factor, guard_floor)
    plan = PruningPlan(
        spec_name,
        model_class,
        tuple(int(s) for s in stack_sizes),
        protect_first=protect_first,
        protect_last=protect_last,
    )
    spec = plan.spec()
    table = _table(per_block_params, plan.stack_sizes, target_kind)
    named = _named_targets(targets, target_kind, level_names)
    layout = plan.layout(spec)

    candidates: list[tuple[float, DepthReplacement]] = []
    skipped: list[dict[str, Any]] = []
    for interval in intervals:
        u, v, score = int(interval.u), int(interval.v), float(interval.score)
        if not (0 <= u <= v < plan.num_blocks) or math.isnan(score):
            raise ConfigError(
                "An interval is out of range or has no score",
                expected=f"inclusive 0 <= u <= v < {plan.num_blocks} and a number score",
                found=f"[{u}, {v}] (inclusive), score {score}",
                fix="check the report's intervals",
            )
        rep = DepthReplacement(Span.from_inclusive(u, v), init)
        issues = rep.issues(layout)
        if issues:
            skipped.append({"inclusive": [u, v], "score": score, "reason": "; ".join(i.what for i in issues)})
        else:
            candidates.append((score, rep))
    candidates.sort(key=lambda c: (c[0], c[1].span))

    accepted, refusal, drafts = _accept_in_order(candidates, named, table, target_kind, guard, skipped)
    kept, dropped = _unique_levels(drafts)
    for draft in drafts:
        note = _level_note(draft, refusal, dropped.get(draft.name), target_kind)
        if note:
            plan.notes.append(note)
            _log.warning("%s", note)
    levels = [_level(d, table, plan.num_blocks, target_kind, refusal) for d in kept]

    plan.replacements = sorted((rep for _, rep in accepted), key=lambda r: r.span)
    plan.levels = levels
    plan.provenance = {
        "selector": "ppcl.plan.plan_from_intervals",
        "rule": "intervals accepted cheapest-first (score ascending, ties by position) until each target is met; "
        "levels are nested prefixes of that order; the budget guard refuses an interval scoring more than "
        "guard_factor x max(largest accepted score, guard_floor), and the order stops there; a level with "
        "the same intervals as a smaller one is dropped",
        "target_kind": target_kind,
        "target_meaning": _TARGET_MEANING[target_kind],
        "targets": {name: target for name, target in named},
        "init": init,
        "order": [{"id": rep.id, "inclusive": list(rep.span.inclusive), "score": score} for score, rep in accepted],
        "skipped": skipped,
        "guard": {
            "factor": guard.factor,
            "floor": guard.floor,
            "reference": "largest accepted score",
            "refused": None if refusal is None else refusal.to_json(),
        },
        "dropped_levels": [
            {"name": d.name, "target": d.target, "same_as": dropped[d.name].name} for d in drafts if d.name in dropped
        ],
        "per_block_params": list(table.per_block) if table is not None else None,
        **dict(provenance or {}),
    }
    plan.validate(spec)
    _log.info(
        "Proposed %d level(s) from %d candidate interval(s): %s",
        len(levels),
        len(candidates),
        ", ".join(f"{lvl.name} ({len(lvl.replacement_ids)} spans)" for lvl in levels),
    )
    return plan


def _table(per_block: Sequence[int] | None, sizes: tuple[int, ...], kind: str) -> ParamTable | None:
    if per_block is None:
        if kind != "blocks":
            raise ConfigError(
                f"Target kind {kind!r} needs per-block parameter counts",
                expected="per_block_params (one count per flat block)",
                found="None",
                fix="pass per_block_params (see ppcl.plan.count.param_table), or use target_kind='blocks'",
            )
        return None
    return ParamTable.from_per_block(per_block, sizes)


def _named_targets(targets: Sequence[float], kind: str, names: Sequence[str] | None) -> list[tuple[str, float]]:
    values = list(targets)
    if not values:
        raise ConfigError("No targets were given", expected="at least one target", found="[]")
    for t in values:
        bad = (
            not isinstance(t, int | float)
            or isinstance(t, bool)
            or not t > 0
            or (kind == "fraction" and t > 1)
            or (kind == "blocks" and t != int(t))
        )
        if bad:
            allowed = {
                "fraction": "a number in (0, 1]",
                "params": "a positive parameter count",
                "blocks": "a positive whole number",
            }[kind]
            raise ConfigError(f"Invalid {kind} target {t!r}", expected=allowed, found=repr(t))
    if len(set(values)) != len(values):
        raise ConfigError("Targets repeat", expected="distinct targets (one level each)", found=str(values))
    if names is None:
        names = [_default_name(kind, t) for t in values]
    elif len(names) != len(values):
        raise ConfigError(
            "level_names and targets differ in length", expected=f"{len(values)} names", found=str(list(names))
        )
    # Levels are nested, so they are listed from the least to the most pruned.
    return sorted(zip(names, values, strict=True), key=lambda nt: nt[1])


def _default_name(kind: str, target: float) -> str:
    if kind == "fraction":
        return f"p{round(target * 100, 6):g}"
    if kind == "blocks":
        return f"b{int(target)}"
    return f"r{human(target)}"


def _removed_params(accepted: Sequence[tuple[float, DepthReplacement]], table: ParamTable | None) -> int | None:
    return None if table is None else sum(rep.removed_params(table) for _, rep in accepted)


def _measure(accepted: Sequence[tuple[float, DepthReplacement]], table: ParamTable | None, kind: str) -> float:
    if kind == "blocks":
        return float(sum(rep.span.removed for _, rep in accepted))
    removed = _removed_params(accepted, table) or 0
    assert table is not None  # checked by _table for parameter targets
    return removed / table.block_total if kind == "fraction" else float(removed)


def _format_target(kind: str, value: float) -> str:
    if kind == "fraction":
        return f"{100 * value:.1f}% of block parameters removed"
    if kind == "params":
        return f"{human(value)} parameters removed"
    return f"{int(value)} blocks removed"


def _describe_level(
    accepted: Sequence[tuple[float, DepthReplacement]],
    table: ParamTable | None,
    total: int,
    kind: str,
    target: float,
    met: bool,
    guarded: bool = False,
) -> str:
    blocks = sum(rep.span.removed for _, rep in accepted)
    text = f"{len(accepted)} spans, {total} → {total - blocks} blocks"
    removed = _removed_params(accepted, table)
    if removed is not None and table is not None:
        text += f", {human(removed)} parameters ({100 * removed / table.block_total:.1f}% of block parameters) removed"
    short = "" if met else (" (NOT reached: budget guard)" if guarded else " (NOT reached)")
    return f"{text}; target {_format_target(kind, target)}{short}"


def _accept_in_order(
    candidates: Sequence[tuple[float, DepthReplacement]],
    named: Sequence[tuple[str, float]],
    table: ParamTable | None,
    kind: str,
    guard: BudgetGuard,
    skipped: list[dict[str, Any]],
) -> tuple[list[tuple[float, DepthReplacement]], Refusal | None, list[_Draft]]:
    """Walk the cheapest-first order once, cutting one prefix per target; overlaps are appended to ``skipped``.

    Returns the accepted intervals in order, the guard's refusal (``None`` if it refused nothing) and one draft
    level per target.
    """
    accepted: list[tuple[float, DepthReplacement]] = []
    refusal: Refusal | None = None
    position = 0
    drafts: list[_Draft] = []
    for name, target in named:
        reached = _measure(accepted, table, kind)
        # Once the guard refused an interval the order ends: every later candidate scores at least as much and the
        # reference (the largest accepted score) no longer grows, so it would be refused too.
        while reached < target * (1 - 1e-12) and position < len(candidates) and refusal is None:
            score, rep = candidates[position]
            clash = next((a.id for _, a in accepted if a.span.overlaps(rep.span)), None)
            if clash is not None:
                position += 1
                skipped.append({"inclusive": list(rep.span.inclusive), "score": score, "reason": f"overlaps {clash}"})
                continue
            limit = guard.limit([s for s, _ in accepted])
            if score > limit:
                refusal = Refusal(rep.span.inclusive, score, max(s for s, _ in accepted), guard.factor, guard.floor)
                break
            position += 1
            accepted.append((score, rep))
            reached = _measure(accepted, table, kind)
        drafts.append(_Draft(name, target, tuple(accepted), reached, reached >= target * (1 - 1e-12)))
    return accepted, refusal, drafts


def _unique_levels(drafts: Sequence[_Draft]) -> tuple[list[_Draft], dict[str, _Draft]]:
    """The drafts without repeats, and ``{dropped name: the kept draft with the same intervals}``.

    Levels are nested prefixes, so equal sets are neighbours; the first (smallest target) keeps its name because it is
    the one whose target those intervals were cut for.
    """
    kept: list[_Draft] = []
    dropped: dict[str, _Draft] = {}
    for draft in drafts:
        if kept and len(kept[-1].accepted) == len(draft.accepted):
            dropped[draft.name] = kept[-1]
        else:
            kept.append(draft)
    return kept, dropped


def _level_note(draft: _Draft, refusal: Refusal | None, same_as: _Draft | None, kind: str) -> str:
    """The plan note for one draft level ("" when it met its target and was kept)."""
    reached = _format_target(kind, draft.reached)
    target = _format_target(kind, draft.target)
    short = _shortfall(draft, refusal, kind)
    if same_as is not None:
        note = (
            f"level {draft.name} (target {target}) dropped: it would hold the same {len(draft.accepted)} "
            f"intervals as level {same_as.name} ({reached})"
        )
        # When the kept level met its own target, no other note says why this one's intervals stop short.
        return note if draft.met or not same_as.met else f"{note}; {short}"
    return "" if draft.met else f"level {draft.name}: target {target} not reached, {short}"


def _shortfall(draft: _Draft, refusal: Refusal | None, kind: str) -> str:
    """Why an unmet level stops where it does: the guard's refusal, or no usable interval left."""
    reached = _format_target(kind, draft.reached)
    if refusal is not None:
        return f"{reached} with {len(draft.accepted)} intervals; the budget guard refused {refusal.text()}"
    return f"all {len(draft.accepted)} usable intervals give {reached}"


def _level(draft: _Draft, table: ParamTable | None, total: int, kind: str, refusal: Refusal | None) -> Level:
    """The plan level of a kept draft, with its description and its worst and cheapest interval scores."""
    scores = [score for score, _ in draft.accepted]
    # An unmet level stopped either because the candidates ran out or because the guard refused the next one; the
    # refusal ends the order, so when there is one every unmet level is short because of it.
    description = _describe_level(
        draft.accepted, table, total, kind, draft.target, draft.met, guarded=refusal is not None
    )
    return Level(
        draft.name,
        tuple(rep.id for _, rep in draft.accepted),
        description,
        worst_score=max(scores) if scores else None,
        cheapest_score=min(scores) if scores else None,
    )


def propose_plan(*args: Any, **kwargs: Any) -> PruningPlan:
    """Deprecated name of :func:`plan_from_intervals` (it read like :func:`ppcl.propose_plan`, which plans from a
    report); kept so existing code keeps working."""
    warnings.warn(
        "ppcl.plan.propose_plan is renamed plan_from_intervals (ppcl.propose_plan plans from a report)",
        DeprecationWarning,
        stacklevel=2,
    )
    return plan_from_intervals(*args, **kwargs)
