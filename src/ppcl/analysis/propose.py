"""From a RedundancyReport to a PruningPlan (the budget rule applied to its intervals), or from a set of removed blocks
(a baseline's selection, as student spans)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ppcl.analysis.baselines import spans_for_removed
from ppcl.analysis.intervals import Interval
from ppcl.analysis.report import RedundancyReport
from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import config_hash
from ppcl.plan import PruningPlan, param_table, propose_plan
from ppcl.plan.count import resolve_model_class
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR


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
    """Nested levels, one per target, accepting the report's intervals cheapest-first (:func:`ppcl.plan.propose_plan`).

    ``model_config`` must be the config of the analysed model (checked by hash); it gives the per-block parameter
    counts, computed on the meta device. ``guard_factor`` / ``guard_floor`` set the budget guard (0 = off): an
    interval scoring more than ``guard_factor`` times the largest accepted score is not forced in to meet a target;
    the level undershoots instead, with a note in ``plan.notes``.
    """
    if config_hash(dict(model_config)) != report.config_hash:
        raise ArtefactError("the report was made for another model config",
                            expected=f"config hash {report.config_hash}",
                            found=f"config hash {config_hash(dict(model_config))}",
                            fix="pass the model that `ppcl analyze` analysed")
    table = param_table(report.model_class, model_config)
    provenance = {"report": {"calibration_hash": report.calibration_hash, "config_hash": report.config_hash,
                             "settings": report.settings}}
    return propose_plan(report.intervals, report.arch, report.model_class, report.stack_sizes, table.per_block,
                        targets, target_kind, level_names, protect_first=report.settings["protect_first"],
                        protect_last=report.settings["protect_last"], init=init, provenance=provenance,
                        guard_factor=guard_factor, guard_floor=guard_floor)


def plan_from_removed(
    removed: Iterable[Interval],
    model_class: type | str,
    model_config: Mapping[str, Any],
    level_name: str = "removed",
    *,
    protect_first: int = 2,
    protect_last: int = 2,
    provenance: Mapping[str, Any] | None = None,
) -> PruningPlan:
    """A one-level plan that removes exactly the blocks of ``removed`` (see :func:`spans_for_removed`).

    Each maximal run ``a..b`` of removed blocks becomes the span ``[a − 1, b]`` (inclusive) with a student copied from
    block ``a − 1``, so an untrained add-on at ``level_name`` is the teacher with those blocks deleted, and the plan
    trains with the usual depth distillation. For a fair comparison with PPCL's plans use the same protection and
    select removed blocks in ``[protect_first + 1, L − 1 − protect_last]``.

    Args:
        removed: dropped-block intervals (``student=False``), e.g. from :mod:`ppcl.analysis.baselines`.
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
    spans = spans_for_removed(removed)
    if not spans:
        raise ConfigError("No block to remove", expected="at least one removed block", found="an empty set")
    cls = resolve_model_class(model_class)
    table = param_table(cls, model_config)
    wanted = sorted(b for s in spans for b in range(s.u + 1, s.v + 1))
    plan = propose_plan(spans, get_spec(cls).name, cls.__name__, table.stack_sizes, table.per_block, [len(wanted)],
                        "blocks", [level_name], protect_first=protect_first, protect_last=protect_last, init="first",
                        # A removed set is taken whole (all scores 0), never budgeted: nothing for the guard to refuse.
                        guard_factor=0,
                        provenance={"selector": "ppcl.analysis.plan_from_removed", "removed_blocks": wanted,
                                    "rule": "each maximal run a..b of removed blocks is the span [a-1, b] (inclusive) "
                                            "with a student copied from block a-1",
                                    **dict(provenance or {})})
    if plan.removed_blocks(level_name) != wanted:
        # propose_plan skips spans it cannot hold; for a removed set that would silently change the selection.
        skipped = "; ".join(f"{d['inclusive']}: {d['reason']}" for d in plan.provenance["skipped"])
        first, last = protect_first + 1, plan.num_blocks - 1 - protect_last
        raise ConfigError("The removed blocks cannot all become student spans",
                          expected=f"removed blocks in [{first}, {last}] (inclusive), no run starting a block stack",
                          found=f"spans (inclusive) {skipped}",
                          fix="select removed blocks inside the range PPCL's spans can remove from")
    return plan
