"""Evaluation of every level of an add-on against its teacher, on the same model object (levels switch in O(1)).

Per level: parameters and blocks, per-step latency ratio (interleaved timing), velocity agreement with the teacher
on fixed batches, and on the toy world ShapesEval and R (mean relative drop of the task scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.eval.flops import forward_flops
from ppcl.eval.latency import interleaved_latency, ratios
from ppcl.eval.metrics import relative_drop, velocity_agreement
from ppcl.logging import get_logger
from ppcl.runtime import STATE_ATTR, active_level, apply_addon, remove_addon, set_level

log = get_logger("eval")
TEACHER = "teacher"


def _name(level: str | None) -> str:
    return TEACHER if level is None else level


@torch.no_grad()
def _predict(model: nn.Module, batches: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.cat([model(**b, return_dict=False)[0] for b in batches])


def evaluate_levels(
    model: nn.Module,
    addon: PruningAddon,
    batches: Sequence[dict[str, Any]],
    levels: Sequence[str] | None = None,
    repeats: int = 10,
    toy: Any = None,
    shapes_eval: dict[str, Any] | None = None,
    teacher_scores: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Rows keyed by level name (``"teacher"`` first): params, FLOPs, latency, agreement and (toy) ShapesEval + R.

    Args:
        model: the base transformer (the add-on is applied for the evaluation and removed afterwards if it was not
            applied before).
        addon: the add-on to evaluate.
        batches: fixed forward-kwargs batches for agreement; the first one is timed.
        levels: level names (default: all of the plan's).
        repeats: interleaved timing repeats.
        toy: a ToyTeacher for ShapesEval (None: skip); ``shapes_eval`` are keyword arguments of
            :func:`ppcl.toy.benchmark.score_model` (e.g. ``{"n_per_category": 60}``).
        teacher_scores: the teacher's ShapesEval under the same protocol, when already known (not re-sampled).
    """
    levels = list(levels) if levels is not None else addon.plan.level_names
    was_applied = getattr(model, STATE_ATTR, None) is not None
    previous = active_level(model) if was_applied else None
    if not was_applied:
        apply_addon(model, addon)
    try:
        rows = {_name(lv): _static_row(model, addon, lv) for lv in [None, *levels]}
        set_level(model, None)
        reference = _predict(model, batches)
        for lv in levels:
            set_level(model, lv)
            rows[lv].update(velocity_agreement(_predict(model, batches), reference))
        rows[TEACHER].update({"cosine": 1.0, "nmse": 0.0})
        for lv in [None, *levels]:
            set_level(model, lv)
            rows[_name(lv)]["flops"] = forward_flops(model, batches[0])
        for row in rows.values():
            row["flops_ratio"] = round(row["flops"] / rows[TEACHER]["flops"], 4)
        timing = interleaved_latency({_name(lv): _timed(model, lv, batches[0]) for lv in [None, *levels]}, repeats)
        for name, ratio in ratios(timing, TEACHER).items():
            rows[name].update(latency_ms=round(timing[name]["median_ms"], 3), latency_ratio=round(ratio, 4))
        if toy is not None:
            _shapes_eval(model, toy, [None, *levels], rows, shapes_eval or {}, teacher_scores)
    finally:
        if was_applied:
            set_level(model, previous)
        else:
            remove_addon(model)
    return rows


def _static_row(model: nn.Module, addon: PruningAddon, level: str | None) -> dict[str, Any]:
    count = addon.plan.param_count(model.config, level)
    return {"params": count.after, "blocks": count.blocks_after,
            "block_params_removed": round(count.block_fraction_removed, 4)}


def _timed(model: nn.Module, level: str | None, batch: dict[str, Any]):
    def run() -> None:
        set_level(model, level)
        model(**batch, return_dict=False)
    return run


def _shapes_eval(model: nn.Module, toy: Any, levels: list[str | None], rows: dict, kwargs: dict[str, Any],
                 teacher_scores: dict[str, Any] | None) -> None:
    from ppcl.toy.benchmark import score_model

    if teacher_scores is not None:
        rows[TEACHER]["shapes_eval"] = dict(teacher_scores)
        levels = [lv for lv in levels if lv is not None]
    for lv in levels:
        set_level(model, lv)
        log.info("eval: ShapesEval of %s", _name(lv))
        rows[_name(lv)]["shapes_eval"] = score_model(toy, transformer=model, **kwargs)
    reference = rows[TEACHER]["shapes_eval"]
    for row in rows.values():
        row["R"] = round(relative_drop(row["shapes_eval"], reference), 4)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of :func:`evaluate_levels` rows."""
    header = ("| level | blocks | params | block params removed | FLOPs ratio | latency ratio | velocity cosine | "
              "NMSE |")
    has_toy = any("shapes_eval" in r for r in rows.values())
    if has_toy:
        header += " ShapesEval overall | R |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in rows.items():
        line = (f"| {name} | {r['blocks']} | {r['params'] / 1e6:.2f}M | {r['block_params_removed']:.1%} | "
                f"{r['flops_ratio']:.3f} | {r.get('latency_ratio', float('nan')):.3f} | {r['cosine']:.4f} | "
                f"{r['nmse']:.4f} |")
        if has_toy:
            line += f" {r['shapes_eval']['overall']:.3f} | {r['R']:.2%} |"
        lines.append(line)
    return "\n".join(lines)
