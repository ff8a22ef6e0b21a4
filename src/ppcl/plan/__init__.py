"""The PruningPlan artefact: which blocks are replaced, grouped into named levels, with parameter counts.

Example (the authors' public Qwen-Image plan, paper notation)::

    reps = [DepthReplacement(Span.from_inclusive(u, v)) for u, v in [(3, 4), (5, 7), ...]]
    plan = PruningPlan("qwenimage", "QwenImageTransformer2DModel", (60,), reps,
                       [Level("public", tuple(r.id for r in reps))]).validate()
    plan.save("runs/plan")                                   # runs/plan/plan.json, written atomically
    plan.param_count(transformer.config, "public").after     # 11_934_618_688 for the 20B model

Spans are half-open flat block ranges (``transformer_blocks[3:5]``); the paper's inclusive ``[3, 4]`` is the same span.
"""

from ppcl.plan.count import (
    ParamCount,
    ParamTable,
    block_param_fraction,
    param_count,
    param_table,
)
from ppcl.plan.from_report import WIDTH_SUFFIX, add_width_levels, plan_from_report, plan_from_spans
from ppcl.plan.guard import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_FLOOR, BudgetGuard, check_guard
from ppcl.plan.plan import PLAN_FILE, Level, PruningPlan
from ppcl.plan.propose import plan_from_intervals, propose_plan
from ppcl.plan.replacements import (
    DepthReplacement,
    Issue,
    Replacement,
    register_replacement,
    replacement_from_json,
    replacement_kinds,
)
from ppcl.plan.span import BlockLayout, Span, describe
from ppcl.plan.width import FFNLinear, TextRun, check_level_width
from ppcl.plan.width_select import (
    dual_stream_blocks,
    select_ffn_blocks,
    select_text_runs,
    select_width,
    with_width_level,
)

__all__ = [
    "DEFAULT_GUARD_FACTOR",
    "DEFAULT_GUARD_FLOOR",
    "PLAN_FILE",
    "BlockLayout",
    "BudgetGuard",
    "DepthReplacement",
    "FFNLinear",
    "Issue",
    "Level",
    "ParamCount",
    "ParamTable",
    "PruningPlan",
    "Replacement",
    "Span",
    "TextRun",
    "block_param_fraction",
    "check_guard",
    "check_level_width",
    "describe",
    "dual_stream_blocks",
    "param_count",
    "param_table",
    "add_width_levels",
    "plan_from_intervals",
    "plan_from_report",
    "plan_from_spans",
    "propose_plan",
    "WIDTH_SUFFIX",
    "register_replacement",
    "replacement_from_json",
    "replacement_kinds",
    "select_ffn_blocks",
    "select_text_runs",
    "select_width",
    "with_width_level",
]
