"""Quality ladder on the committed toy teacher (issue 8): PPCL against depth-pruning baselines at one fixed budget.

Every variant removes the same number of blocks (``--remove``, default 8 of 16 = 50% of block parameters) from the
same range, trains with the same steps and data (ToyDistillData seed 0) and is scored the same way (velocity cosine
on fixed batches, ShapesEval + R):

1. no-distill drop: PPCL's intervals with untrained students (copies of their first block = blocks simply removed);
2. per-layer Block-Influence (ShortGPT) selection + sequential distillation (the paper's baseline);
   2b. the same selection + non-sequential distillation (isolates the selection from the training mode);
3. PPCL intervals + sequential distillation;
4. PPCL intervals + non-sequential distillation (the method);
5. TinyFusion-style uniform removal (evenly spaced; every other layer when removing half the range) +
   non-sequential distillation;
6. random scattered blocks (seeded) + non-sequential distillation;
7. contiguous vs scattered removal of ``--contiguous-remove`` blocks, untrained and trained (non-sequential).

A baseline's removed set becomes student spans (:func:`ppcl.analysis.baselines.spans_for_removed`): the kept block
before each run of removed blocks absorbs it, so untrained it is exactly "drop those blocks" and the same depth
distillation trains it. Baselines pick blocks in ``[protect + 1, L − 1 − protect]``, the blocks PPCL's spans can
remove. The "+ width" and "+ fine-tune" rows come from benchmarks/width_ladder.py (read, never re-run).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _results import append
from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, RedundancyReport, analyze
from ppcl.analysis.baselines import (
    every_other_layer,
    random_blocks,
    select_by_influence,
)
from ppcl.analysis.intervals import Interval
from ppcl.api import plan_from_removed
from ppcl.distill import DistillConfig, distill_depth
from ppcl.errors import ConfigError
from ppcl.eval.levels import TEACHER, evaluate_levels
from ppcl.plan import PruningPlan, plan_from_report
from ppcl.toy.calibrate import calibrate_toy
from ppcl.toy.distill_data import ToyDistillData
from ppcl.toy.teacher import ToyTeacher

LEVEL = "removed"  # the single level of every plan built here
PPCL_NONSEQ = "(4) PPCL intervals + non-sequential"
WIDTH_ROWS = (("trained", "+ width text + FFN, trained"), ("tuned", "+ fine-tune"))


@dataclass
class Variant:
    """One row: a plan whose level ``LEVEL`` removes ``removed``, trained with ``mode`` (None: untrained)."""

    label: str
    plan: PruningPlan
    mode: str | None
    group: str = "ladder"  # "ladder" (fixed budget) or "contiguity" (table 7)

    @property
    def removed(self) -> list[int]:
        return self.plan.removed_blocks(LEVEL)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return sorted(rep.span.inclusive for rep in self.plan.replacements_of(LEVEL))

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.label.lower()).strip("-")


# ------------------------------------------------------------------------------------------------- selection
def influence(report: RedundancyReport, stream: str) -> np.ndarray:
    """Per-block Block Influence from the report (``"mean"``: the average of the image and text streams)."""
    if stream == "mean":
        return (report.block_influence["image"] + report.block_influence["text"]) / 2
    return report.block_influence[stream]


def dropped(blocks: list[int]) -> list[Interval]:
    """Removed blocks as baseline (dropped-block) intervals."""
    return [Interval(b, b, student=False) for b in blocks]


def contiguous_window(bi: np.ndarray, n: int, first: int, last: int) -> list[int]:
    """The ``n`` consecutive blocks of ``[first, last]`` with the lowest total Block Influence."""
    starts = range(first, last - n + 2)
    if not starts:
        raise ConfigError("No contiguous window fits", expected=f"n <= {last - first + 1}", found=str(n))
    best = min(starts, key=lambda a: (float(bi[a : a + n].sum()), a))
    return list(range(best, best + n))


def scattered_lowest(bi: np.ndarray, n: int, first: int, last: int) -> list[int]:
    """The ``n`` lowest-BI blocks of ``[first, last]`` with no two adjacent (greedy, lowest BI first).

    Same criterion as :func:`contiguous_window`, so table 7 compares contiguity, not selection quality.
    """
    picked: list[int] = []
    for b in sorted(range(first, last + 1), key=lambda i: (float(bi[i]), i)):
        if len(picked) < n and all(abs(b - p) > 1 for p in picked):
            picked.append(b)
    if len(picked) < n:
        raise ConfigError(
            "Not enough non-adjacent blocks",
            expected=f"{n} scattered blocks in [{first}, {last}]",
            found=f"{len(picked)}",
            fix="lower --contiguous-remove",
        )
    return sorted(picked)


def variants(
    report: RedundancyReport, ppcl: PruningPlan, model: torch.nn.Module, args: argparse.Namespace
) -> list[Variant]:
    """Every variant, PPCL's first (its untrained evaluation samples the teacher once for all)."""
    n, total = len(ppcl.removed_blocks(LEVEL)), ppcl.num_blocks
    first, last = args.protect + 1, total - 1 - args.protect  # the blocks PPCL's spans can remove
    bi = influence(report, args.bi_stream)

    def removed(blocks: list[Interval], selector: str) -> PruningPlan:
        return plan_from_removed(
            blocks,
            type(model),
            model.config,
            LEVEL,
            protect_first=args.protect,
            protect_last=args.protect,
            provenance={"baseline": selector},
        )

    bi_plan = removed(select_by_influence(bi, n, first, last), f"Block Influence ({args.bi_stream} stream)")
    uniform = removed(every_other_layer(first, last, n), "uniform (every other layer)")
    rand = removed(random_blocks(first, last, n, seed=args.seed), f"random, seed {args.seed}")
    k = args.contiguous_remove
    contiguous = removed(dropped(contiguous_window(bi, k, first, last)), "contiguous lowest-BI window")
    scattered = removed(dropped(scattered_lowest(bi, k, first, last)), "scattered lowest-BI, non-adjacent")
    return [
        Variant("(1) no-distill drop (PPCL intervals)", ppcl, None),
        Variant("(2) Block Influence + sequential", bi_plan, "sequential"),
        Variant("(2b) Block Influence + non-sequential", bi_plan, "nonsequential"),
        Variant("(3) PPCL intervals + sequential", ppcl, "sequential"),
        Variant(PPCL_NONSEQ, ppcl, "nonsequential"),
        Variant("(5) uniform (evenly spaced, TinyFusion-style) + non-sequential", uniform, "nonsequential"),
        Variant(f"(6) random (seed {args.seed}) + non-sequential", rand, "nonsequential"),
        Variant(f"(7) contiguous {k}, no training", contiguous, None, "contiguity"),
        Variant(f"(7) scattered {k}, no training", scattered, None, "contiguity"),
        Variant(f"(7) contiguous {k}, trained", contiguous, "nonsequential", "contiguity"),
        Variant(f"(7) scattered {k}, trained", scattered, "nonsequential", "contiguity"),
    ]


# ------------------------------------------------------------------------------------------- train, evaluate
def train(teacher: ToyTeacher, variant: Variant, args: argparse.Namespace, out: Path) -> tuple[PruningAddon, float]:
    """A fresh add-on of the variant's plan, distilled with the shared settings and data; returns it and seconds."""
    addon = PruningAddon.from_plan(teacher.transformer, variant.plan)
    if variant.mode is None:
        return addon, 0.0
    config = DistillConfig(
        mode=variant.mode,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup=max(1, args.steps // 20),
        checkpoint_every=0,
        seed=0,
    )
    data = ToyDistillData(teacher, args.batch_size, seed=0)  # the same batches for every variant
    t0 = time.perf_counter()
    distill_depth(teacher.transformer, addon, data, config, out / "train" / variant.slug, level=LEVEL)
    return addon, round(time.perf_counter() - t0, 1)


def row_of(
    variant: Variant, evaluated: dict[str, dict[str, Any]], seconds: float, eval_seconds: float
) -> dict[str, Any]:
    """The results.json row of one variant."""
    r = evaluated[LEVEL]
    return {
        "label": variant.label,
        "group": variant.group,
        "mode": variant.mode or "none",
        "removed_blocks": variant.removed,
        "spans_inclusive": [list(s) for s in variant.spans],
        "selector": variant.plan.provenance.get("baseline", "PPCL intervals (plan_from_report)"),
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "blocks": r["blocks"],
        "block_params_removed": r["block_params_removed"],
        "cosine": r["cosine"],
        "nmse": r["nmse"],
        "shapes_eval": r["shapes_eval"],
        "R": r["R"],
    }


# ---------------------------------------------------------------------------------------------------- report
def noise(a: float, b: float, n: int) -> float:
    """Two unpaired binomial standard errors of a difference of two ShapesEval rates over ``n`` images each.

    Conservative: both models share prompts and noise, so the paired error is smaller.
    """
    return 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``"better"``, ``"worse"`` or ``"tied"``: ``a`` against ``b`` on ShapesEval overall (2 SE), then cosine."""
    sa, sb = a["shapes_eval"]["overall"], b["shapes_eval"]["overall"]
    if abs(sa - sb) > noise(sa, sb, int(a["shapes_eval"]["n_images"])):
        return "better" if sa > sb else "worse"
    return "tied"


def verdict(rows: list[dict[str, Any]]) -> str:
    """The auto-generated summary: the best fixed-budget variant and every baseline PPCL does not beat."""
    ladder = [r for r in rows if r["group"] == "ladder"]
    best = max(ladder, key=lambda r: (r["shapes_eval"]["overall"], r["cosine"]))
    ppcl = next(r for r in ladder if r["label"] == PPCL_NONSEQ)
    text = [
        (
            f"Best at this budget by ShapesEval overall: {best['label']} ({best['shapes_eval']['overall']:.3f}, "
            f"R {best['R']:.2%}, velocity cosine {best['cosine']:.4f})."
        )
    ]
    others = [r for r in ladder if r is not ppcl]
    not_beaten = [r for r in others if compare(ppcl, r) != "better"]
    cos_lost = [r for r in others if r["cosine"] >= ppcl["cosine"]]
    if not_beaten:
        text.append(
            "PPCL (4) does NOT beat by more than 2 standard errors of ShapesEval: "
            + "; ".join(
                f"{r['label']} ({r['shapes_eval']['overall']:.3f} vs {ppcl['shapes_eval']['overall']:.3f}, "
                f"{'ahead of PPCL' if compare(ppcl, r) == 'worse' else 'within noise'})"
                for r in not_beaten
            )
            + "."
        )
    else:
        text.append("PPCL (4) beats every other variant by more than 2 standard errors of ShapesEval.")
    if cos_lost:
        text.append(
            "Velocity cosine at least PPCL (4)'s: "
            + "; ".join(f"{r['label']} ({r['cosine']:.4f} vs {ppcl['cosine']:.4f})" for r in cos_lost)
            + "."
        )
    return " ".join(text)


def contiguity_verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence per training state: is contiguous removal better than scattered?"""
    parts = []
    for state in ("no training", "trained"):
        pair = [r for r in rows if r["group"] == "contiguity" and r["label"].endswith(state)]
        c, s = (next(r for r in pair if "contiguous" in r["label"]), next(r for r in pair if "scattered" in r["label"]))
        relation = {"better": "better than", "worse": "worse than", "tied": "tied with"}[compare(c, s)]
        parts.append(
            f"{state}: contiguous is {relation} scattered on ShapesEval "
            f"({c['shapes_eval']['overall']:.3f} vs {s['shapes_eval']['overall']:.3f}), velocity cosine "
            f"{c['cosine']:.4f} vs {s['cosine']:.4f}"
        )
    return "Contiguous vs scattered, " + "; ".join(parts) + "."


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: variant | removed blocks | spans | block params removed | cosine | ShapesEval | R."""
    lines = [
        (
            "| variant | removed blocks (inclusive) | spans (inclusive, student = first block) | block params removed "
            "| velocity cosine | ShapesEval overall | R |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spans = " ".join(f"[{u},{v}]" for u, v in r["spans_inclusive"])
        lines.append(
            f"| {r['label']} | {r['removed_blocks']} | {spans} | {r['block_params_removed']:.1%} | "
            f"{r['cosine']:.4f} | {r['shapes_eval']['overall']:.3f} | {r['R']:.2%} |"
        )
    return lines


def width_rows(path: Path, teacher_scores: dict[str, Any]) -> list[str]:
    """The "+ width" / "+ fine-tune" rows of benchmarks/width_ladder.py, if its results exist (never re-run)."""
    if not path.exists():
        return [
            (
                f"(No {path}: run benchmarks/depth_ladder.py then benchmarks/width_ladder.py for the + width and "
                "+ fine-tune rows.)"
            )
        ]
    data = json.loads(path.read_text())
    lines = [
        f"From {path} (benchmarks/width_ladder.py on the depth ladder's p50 plan; not re-run here):",
        "",
        "| stage | block params removed | velocity cosine | ShapesEval overall | R |",
        "|---|---|---|---|---|",
    ]
    for key, label in WIDTH_ROWS:
        level = next(n for n in data[key] if n.endswith("+w"))
        r = data[key][level]
        lines.append(
            f"| {label} ({level}) | {r['block_params_removed']:.1%} | {r['cosine']:.4f} | "
            f"{r['shapes_eval']['overall']:.3f} | {r['R']:.2%} |"
        )
    theirs = data["tuned"][TEACHER]["shapes_eval"]
    if theirs["n_images"] != teacher_scores["n_images"]:
        lines.append(
            f"\nTheir teacher was scored on {theirs['n_images']} images, ours on "
            f"{teacher_scores['n_images']}: compare R, not raw scores."
        )
    return lines


def report_body(
    rows: list[dict[str, Any]], teacher_scores: dict[str, Any], args: argparse.Namespace, first: int, last: int, n: int
) -> str:
    """The RESULTS.md section."""
    ladder = [r for r in rows if r["group"] == "ladder"]
    contiguity = [r for r in rows if r["group"] == "contiguity"]
    budget = f"{n} of {ladder[0]['blocks'] + n} blocks" + (
        "" if n == args.remove else f" (PPCL's plan for --remove {args.remove} removes {n})"
    )
    lines = [
        (
            f"Budget: {budget}, every variant. Baselines select removed blocks in [{first}, {last}] (inclusive), "
            f"the blocks PPCL's spans (protect {args.protect} at each end) can remove; a removed run a..b runs as "
            "the span [a-1, b] whose student starts as a copy of block a-1 (untrained = the blocks dropped). "
            f"Block Influence from the {args.bi_stream} stream of the calibration report. Uniform = {n} evenly "
            f"spaced blocks of those {last - first + 1} (literally every other block only when removing half)."
        ),
        "",
        f"Teacher ShapesEval overall {teacher_scores['overall']:.3f} ({teacher_scores['n_images']} images).",
        "",
        *table(ladder),
        "",
        verdict(rows),
        "",
        (
            f"Contiguous vs scattered removal of {args.contiguous_remove} blocks (both the lowest Block Influence "
            "choice of their kind; trained = non-sequential):"
        ),
        "",
        *table(contiguity),
        "",
        contiguity_verdict(rows),
        "",
        *width_rows(Path(args.width_results), teacher_scores),
        "",
        (
            f"Training: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, the same data (ToyDistillData "
            f"seed 0) for every variant; ShapesEval {args.per_category} prompts per category x 2 seeds. "
            "'Better'/'worse' need a ShapesEval gap above 2 unpaired binomial standard errors; smaller gaps are "
            "called ties."
        ),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--remove", type=int, default=8, help="blocks removed by every variant (PPCL's plan target)")
    parser.add_argument("--contiguous-remove", type=int, default=4, help="blocks removed in table 7")
    parser.add_argument("--protect", type=int, default=2, help="blocks protected at each end")
    parser.add_argument("--bi-stream", choices=("image", "text", "mean"), default="image")
    parser.add_argument("--per-category", type=int, default=60, help="ShapesEval prompts per category (x2 seeds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-blocks baseline")
    parser.add_argument("--width-results", default="runs/ladder/width_results.json")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return parser.parse_args()


def main() -> None:
    args = parse()
    out = Path(args.out)
    if (out / "train").exists():
        # distill_depth refuses to overwrite a run; fail before the analysis rather than after the first training.
        raise SystemExit(f"{out / 'train'} already holds training runs: pass a new --out")
    teacher = ToyTeacher.load()
    model = teacher.transformer
    report = analyze(
        model, calibrate_toy(teacher), AnalysisConfig(protect_first=args.protect, protect_last=args.protect)
    )
    report.save(out / "report")
    # Every selector removes exactly --remove blocks: the budget guard must not stop PPCL short (guard_factor=0).
    ppcl = plan_from_report(report, model.config, [args.remove], "blocks", [LEVEL], guard_factor=0)
    batches = [ToyDistillData(teacher, 32, seed=12345).batch(i) for i in range(4)]
    shapes = {"n_per_category": args.per_category}
    rows: list[dict[str, Any]] = []
    known: dict[str, Any] | None = None
    for variant in variants(report, ppcl, model, args):
        variant.plan.save(out / "plans" / variant.slug)
        addon, seconds = train(teacher, variant, args, out)
        t0 = time.perf_counter()
        evaluated = evaluate_levels(model, addon, batches, [LEVEL], 5, teacher, shapes, known)
        known = evaluated[TEACHER]["shapes_eval"]  # the teacher is sampled once, by the first variant
        rows.append(row_of(variant, evaluated, seconds, round(time.perf_counter() - t0, 1)))
        (out / "results.json").write_text(
            json.dumps(
                {
                    "teacher": known,
                    "rows": rows,
                    "args": vars(args),
                    "block_influence": influence(report, args.bi_stream).tolist(),
                },
                indent=2,
            )
        )
    assert known is not None
    n = len(ppcl.removed_blocks(LEVEL))
    body = report_body(rows, known, args, args.protect + 1, ppcl.num_blocks - 1 - args.protect, n)
    (out / "section.md").write_text(body + "\n")
    if not args.no_append:
        append("Quality ladder on the toy teacher: PPCL vs depth-pruning baselines at a fixed budget", body)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
