"""Per-step latency and FLOPs of every pruning level of the committed toy teacher, at batch 1 and batch 32.

The plan is the analysis plan of benchmarks/depth_ladder.py (calibrate_toy → analyze → plan_from_report, nested levels
removing ~25 / 37.5 / 50 % of block parameters) plus width levels (benchmarks/width_ladder.py ``_width_plan``):
``X+t`` (text runs) on every depth level and ``M+w`` (text runs + FFN blocks) on the middle level ``M``.

Latency does not depend on the weights' values, so the add-on is untrained (``PruningAddon.from_plan``). Every level
runs twice: *applied* (the add-on plugged into the base model, ``set_level`` per call: the pluggable form) and
*merged* (``ppcl.runtime.merge``: the replaced blocks physically gone). All variants of one batch size are timed
interleaved in one process (``ppcl.eval.latency.interleaved_latency``: median of the repeats, rotated order), so slow
drifts of the machine spread evenly over them. FLOPs come from ``ppcl.eval.flops.forward_flops`` (torch's
FlopCounterMode) on the applied model (attention included).
The output states the torch threads and the machine's load average.

Usage (appends a table to benchmarks/RESULTS.md unless ``--no-append``)::

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/speed.py
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, analyze
from ppcl.eval.flops import forward_flops
from ppcl.eval.latency import interleaved_latency, ratios
from ppcl.plan import PruningPlan, plan_from_report
from ppcl.runtime import apply_addon, merge, remove_addon, set_level
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher
from width_ladder import _width_plan

TEACHER = "teacher"
MERGED = " (merged)"


def build_plan(teacher: ToyTeacher, targets: Sequence[float], protect: int, ffn_blocks: int) -> PruningPlan:
    """The analysis plan (one depth level per target) + ``X+t`` levels + ``M+w`` on the middle depth level ``M``."""
    model = teacher.transformer
    report = analyze(model, calibrate_toy(teacher), AnalysisConfig(protect_first=protect, protect_last=protect))
    plan = plan_from_report(report, model.config, list(targets), guard_factor=0)  # fixed budgets, as before the guard
    middle = plan.level_names[len(plan.level_names) // 2]
    plan, _, _ = _width_plan(plan, report, middle, ffn_blocks)
    return plan


def _step(model: nn.Module, level: str | None, batch: dict[str, Any]) -> Callable[[], None]:
    """One denoising step of the add-on-applied ``model`` at ``level`` (``set_level`` is O(1); None: the teacher)."""

    def run() -> None:
        set_level(model, level)
        model(**batch, return_dict=False)

    return run


def _plain_step(model: nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    """One denoising step of a merged model (no add-on)."""

    def run() -> None:
        model(**batch, return_dict=False)

    return run


def measure(
    model: nn.Module,
    merged: dict[str, nn.Module],
    levels: Sequence[str],
    batch: dict[str, Any],
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, float]]:
    """Rows ``{teacher, level...}``: FLOPs and their ratio, applied and merged median ms and ratios vs the teacher.

    Args:
        model: the base model with the add-on applied.
        merged: level → merged model.
        levels: the add-on's level names.
        batch: forward kwargs, e.g. ``hidden_states`` ``(B, N_img, C)``, ``encoder_hidden_states`` ``(B, N_txt, D)``.
    """
    rows: dict[str, dict[str, float]] = {}
    for level in [None, *levels]:
        set_level(model, level)
        rows[level or TEACHER] = {"flops": float(forward_flops(model, batch))}
    variants = {(lv or TEACHER): _step(model, lv, batch) for lv in [None, *levels]}
    variants.update({lv + MERGED: _plain_step(merged[lv], batch) for lv in levels})
    timing = interleaved_latency(variants, repeats, warmup)
    ratio = ratios(timing, TEACHER)
    for name, row in rows.items():
        row["flops_ratio"] = row["flops"] / rows[TEACHER]["flops"]
        row["applied_ms"], row["applied_ratio"] = timing[name]["median_ms"], ratio[name]
        merged_name = TEACHER if name == TEACHER else name + MERGED
        row["merged_ms"], row["merged_ratio"] = timing[merged_name]["median_ms"], ratio[merged_name]
        row["applied_iqr_ms"] = timing[name]["iqr_ms"]
    return rows


def format_table(plan: PruningPlan, config: Any, results: dict[int, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per level; per batch size FLOPs ratio, applied and merged latency ratio (median ms)."""
    sizes = list(results)
    head = "| level | blocks | params |" + "".join(
        f" FLOPs ratio b{b} | latency applied b{b} | latency merged b{b} |" for b in sizes
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in results[sizes[0]]:
        count = plan.param_count(config, None if name == TEACHER else name)
        cells = [f"| {name} | {count.blocks_after} | {count.after / 1e6:.2f}M |"]
        for b in sizes:
            r = results[b][name]
            cells.append(
                f" {r['flops_ratio']:.3f} | {r['applied_ratio']:.3f} ({r['applied_ms']:.1f} ms) | "
                f"{r['merged_ratio']:.3f} ({r['merged_ms']:.1f} ms) |"
            )
        lines.append("".join(cells))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.25,0.375,0.5", help="block-parameter fractions removed per level")
    parser.add_argument("--protect", type=int, default=2, help="blocks protected at each end")
    parser.add_argument("--ffn-blocks", type=int, default=2, help="FFN blocks of the middle level's +w level")
    parser.add_argument("--batches", default="1,32", help="batch sizes")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per variant (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Plan, add-on, merged models, interleaved timing per batch size; prints and appends the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = ToyTeacher.load()
    model = teacher.transformer.eval()
    plan = build_plan(teacher, [float(t) for t in args.targets.split(",")], args.protect, args.ffn_blocks)
    addon = PruningAddon.from_plan(model, plan)
    merged = {lv: merge(model, addon, lv).eval() for lv in plan.level_names}
    apply_addon(model, addon)
    results: dict[int, dict[str, dict[str, float]]] = {}
    load_before = os.getloadavg()[0]  # other processes skew absolute times (ratios less: interleaved)
    try:
        for size in (int(b) for b in args.batches.split(",")):
            batch = ToyDistillData(teacher, size, seed=12345).batch(0)
            results[size] = measure(model, merged, plan.level_names, batch, args.repeats, args.warmup)
    finally:
        remove_addon(model)
    load = (
        f"1-min load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"
    )
    body = "\n".join(
        [
            (
                f"Toy teacher (16 blocks), untrained add-on (latency does not depend on weights); {torch.get_num_threads()} "
                f"torch thread(s); per batch size all variants interleaved, {args.repeats} repeats after {args.warmup} "
                "warm-up rounds, median; ratios vs the teacher (applied: the add-on plugged in, set_level per call; merged: "
                "ppcl.runtime.merge). FLOPs by torch FlopCounterMode (attention included); " + load + "."
            ),
            "",
            f"Plan: {plan.summary()}",
            "",
            format_table(plan, dict(model.config), results),
        ]
    )
    print(body)
    out = {"threads": torch.get_num_threads(), "load": load, "plan": plan.to_json(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if not args.no_append:
        append("Per-step latency and FLOPs per level on the toy teacher (batch 1 and 32)", body)
    return out


if __name__ == "__main__":
    main()
