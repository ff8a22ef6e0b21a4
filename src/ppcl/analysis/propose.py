"""From a RedundancyReport to a PruningPlan: the budget rule applied to the report's intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ppcl.analysis.report import RedundancyReport
from ppcl.errors import ArtefactError
from ppcl.io import config_hash
from ppcl.plan import PruningPlan, param_table, propose_plan


def plan_from_report(
    report: RedundancyReport,
    model_config: Mapping[str, Any],
    targets: Sequence[float] = (0.25, 0.4, 0.5),
    target_kind: str = "fraction",
    level_names: Sequence[str] | None = None,
    init: str = "first",
) -> PruningPlan:
    """Nested levels, one per target, accepting the report's intervals cheapest-first.

    ``model_config`` must be the config of the analysed model (checked by hash); it gives the per-block parameter
    counts, computed on the meta device.
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
                        protect_last=report.settings["protect_last"], init=init, provenance=provenance)
