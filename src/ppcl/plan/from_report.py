"""Plans made from a redundancy report: the one place where a report becomes a :class:`PruningPlan`.

:func:`plan_from_report` applies the paper's budget rule (:func:`~ppcl.plan.propose.plan_from_intervals`) to the
report's intervals; :func:`plan_from_spans` turns given spans (a baseline's removed set) into a one-level plan;
:func:`add_width_levels` adds a width level on top of each depth level from the report's text CKA and FFN errors.
The report is read through its attributes only, so planning never imports :mod:`ppcl.analysis` (which never imports
:mod:`ppcl.plan` either: analysis measures, plan decides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import config_hash
from ppcl.plan.count import param_table, resolve_model_class
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR
from ppcl.plan.plan import PruningPlan
from ppcl.plan.propose import IntervalLike, plan_from_intervals
from ppcl.plan.width_select import (
    DEFAULT_TEXT_CKA_THRESHOLD,
    dual_stream_blocks,
    select_ffn_blocks,
    select_width,
    with_width_level,
)

if TYPE_CHECKING:
    from ppcl.analysis.report import RedundancyReport


def plan_from_report(
    report: RedundancyReport,
    model_config: Mapping[str, Any],
    targets: Sequence[float] = (0.25, 0.4, 0.5),
    target_kind: str = "fraction",
    level_names: Sequence[str] | None = None,
    init: str = "first",
    *,
    guard_factor: float = DEFAULT_GUARD_FACTOR,
    guard_floor: float = DEFAULT_GUARD_FLOOR,
) -> PruningPlan:
    """Nested levels, one per target, accepting the report's intervals cheapest-first (:func:`plan_from_intervals`).

    ``model_config`` must be the config of the analysed model (checked by hash); it gives the per-block parameter
    counts, computed on the meta device. ``guard_factor`` / ``guard_floor`` set the budget guard (0 = off): an
    interval scoring more than ``guard_factor`` times the largest accepted score is not forced in to meet a target;
    the level undershoots instead, with a note in ``plan.notes``.
    """
    if config_hash(dict(model_config)) != report.config_hash:
        raise ArtefactError(
            "the report was made for another model config",
            expected=f"config hash {report.config_hash}",
            found=f"config hash {config_hash(dict(model_config))}",
            fix="pass the model that `ppcl analyze` analysed",
        )
    table = param_table(report.model_class, model_config)
    provenance = {
        "report": {
            "calibration_hash": report.calibration_hash,
            "config_hash": report.config_hash,
            "settings": report.settings,
        }
    }
    return plan_from_intervals(
        report.intervals,
        report.arch,
        report.model_class,
        report.stack_sizes,
        table.per_block,
        targets,
        target_kind,
        level_names,
        protect_first=report.settings["protect_first"],
        protect_last=report.settings["protect_last"],
        init=init,
        provenance=provenance,
        guard_factor=guard_factor,
        guard_floor=guard_floor,
    )


def plan_from_spans(
    spans: Sequence[IntervalLike],
    model_class: type | str,
    model_config: Mapping[str, Any],
    level_name: str = "removed",
    *,
    protect_first: int = 2,
    protect_last: int = 2,
    provenance: Mapping[str, Any] | None = None,
) -> PruningPlan:
    """A one-level plan whose spans are exactly ``spans`` (e.g. a baseline's removed set, as student spans from
    :func:`ppcl.analysis.baselines.spans_for_removed`; :func:`ppcl.api.plan_from_removed` chains the two).

    Each maximal run ``a..b`` of removed blocks becomes the span ``[a − 1, b]`` (inclusive) with a student copied from
    block ``a − 1``, so an untrained add-on at ``level_name`` is the teacher with those blocks deleted, and the plan
    trains with the usual depth distillation. For a fair comparison with PPCL's plans use the same protection and
    select removed blocks in ``[protect_first + 1, L − 1 − protect_last]``.

    Args:
        spans: student spans (inclusive ``u``, ``v``): each removes blocks ``u + 1 .. v``.
        model_class: the base transformer's class (or class name); with ``model_config`` it gives the block stacks
            and per-block parameter counts (meta device).
        model_config: the base transformer's config.
        level_name: the plan's only level.
        protect_first, protect_last: recorded in the plan; no span may cover these blocks.
        provenance: extra provenance (e.g. which selector picked the blocks).

    Raises:
        ConfigError: nothing to remove, block 0 removed, or a span the plan cannot hold (it covers a protected block
            or crosses a block-stack boundary); the message names the offending runs.
    """
    if not spans:
        raise ConfigError("No block to remove", expected="at least one removed block", found="an empty set")
    cls = resolve_model_class(model_class)
    table = param_table(cls, model_config)
    wanted = sorted(b for s in spans for b in range(s.u + 1, s.v + 1))
    plan = plan_from_intervals(
        spans,
        get_spec(cls).name,
        cls.__name__,
        table.stack_sizes,
        table.per_block,
        [len(wanted)],
        "blocks",
        [level_name],
        protect_first=protect_first,
        protect_last=protect_last,
        init="first",
        # A removed set is taken whole (all scores 0), never budgeted: nothing for the guard to refuse.
        guard_factor=0,
        provenance={
            "selector": "ppcl.plan_from_removed",
            "removed_blocks": wanted,
            "rule": "each maximal run a..b of removed blocks is the span [a-1, b] (inclusive) "
            "with a student copied from block a-1",
            **dict(provenance or {}),
        },
    )
    if plan.removed_blocks(level_name) != wanted:
        # propose_plan skips spans it cannot hold; for a removed set that would silently change the selection.
        skipped = "; ".join(f"{d['inclusive']}: {d['reason']}" for d in plan.provenance["skipped"])
        first, last = protect_first + 1, plan.num_blocks - 1 - protect_last
        raise ConfigError(
            "The removed blocks cannot all become student spans",
            expected=f"removed blocks in [{first}, {last}] (inclusive), no run starting a block stack",
            found=f"spans (inclusive) {skipped}",
            fix="select removed blocks inside the range PPCL's spans can remove from",
        )
    return plan


WIDTH_SUFFIX = "+w"


def add_width_levels(
    plan: PruningPlan,
    report: RedundancyReport,
    *,
    threshold: float | None = None,
    ffn_blocks: int = 2,
    suffix: str = WIDTH_SUFFIX,
) -> PruningPlan:
    """A copy of ``plan`` with, for each depth level ``X``, a level ``X + suffix`` = ``X`` + width replacements.

    Text runs and FFN blocks come from :func:`ppcl.plan.width_select.select_width` on ``report``, then are fitted to
    each level: a run's ends may not be blocks that ``X``'s depth spans remove, so the last block moves back to the
    nearest kept one and a removed anchor moves forward (kept only if the report's text CKA from the new anchor still
    meets ``threshold``); FFN blocks are chosen among the blocks ``X`` keeps. A plan without levels gets one level
    ``"w"`` (width only). The result is validated.

    Args:
        plan: a plan made from ``report`` (same model).
        report: the RedundancyReport (``text_cka``, ``ffn_rel_error``).
        threshold: minimum text-stream CKA of a run (default: the selector's, 0.95).
        ffn_blocks: FFN blocks replaced per level.
        suffix: appended to each depth level's name.

    Raises:
        ConfigError: bad ``threshold``/``ffn_blocks``, or a level name that already exists.
    """
    cut = DEFAULT_TEXT_CKA_THRESHOLD if threshold is None else float(threshold)
    runs, _ = select_width(report, threshold=cut, ffn_k=0)
    allowed = dual_stream_blocks(report.arch, report.stack_sizes)
    bases: list[str | None] = list(plan.level_names) or [None]
    out = plan
    for base in bases:
        name = f"{base}{suffix}" if base is not None else "w"
        if name in out.level_names:
            raise ConfigError(
                f"The plan already has a level {name!r}",
                expected="new width level names",
                found=f"levels {out.level_names}",
                fix="pass a plan without width levels",
            )
        gone = set(plan.removed_blocks(base)) if base is not None else set()
        fitted = _fit_runs(runs, gone, report.text_cka, cut)
        pruned = [j for a, b in fitted for j in range(a + 1, b + 1)]
        ffns = select_ffn_blocks(
            report.ffn_rel_error, ffn_blocks, text_pruned=pruned, allowed=[i for i in allowed if i not in gone]
        )
        if not fitted and not ffns:
            continue  # nothing to add on top of this level: no empty twin
        desc = (
            f"{base or 'teacher'} + {len(fitted)} text run(s) (inclusive {fitted}) + FFN blocks "
            f"{[f.block for f in ffns]}"
        )
        out = with_width_level(out, name, fitted, ffns, base_level=base, description=desc)
    return out


def _fit_runs(
    runs: Sequence[tuple[int, int]], gone: set[int], text_cka: Any, threshold: float
) -> list[tuple[int, int]]:
    """Inclusive runs moved off depth-removed ends (see :func:`add_width_levels`)."""
    cka = np.asarray(text_cka, dtype=np.float64)
    fitted = []
    for a, b in runs:
        while b in gone and b > a:
            b -= 1
        moved = a
        while a in gone and a < b:
            a += 1
        # A run needs a kept block after its anchor; a moved anchor must still see high text CKA to the run's end.
        if b <= a or not any(j not in gone for j in range(a + 1, b + 1)):
            continue
        if moved != a and not all(
            np.isfinite(cka[a + 1, k]) and cka[a + 1, k] >= threshold for k in range(a + 2, b + 2)
        ):
            continue
        fitted.append((a, b))
    return fitted
