"""Which width replacement of a trained demo add-on costs what: ShapesEval of sub-levels of its top level.

From a finished demo run (``--run``, its ``finetune/addon``), the top level's replacements are grouped into depth
spans, text-stream runs and FFN linears, and these sub-levels are scored on the toy teacher (no training): depth only,
depth + FFNs, depth + every text run, and depth + each text run alone. Noise seeds default to held-out ones (5, 6),
not the demo's evaluation seeds (0, 1), so that a plan chosen from this table is not chosen on the benchmark's own
images. Appends one table to benchmarks/RESULTS.md.

    python benchmarks/width_sublevels.py --run ppcl-demo --per-category 20
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from _results import append
from ppcl.addon import PruningAddon
from ppcl.demo.run import TOP_LEVEL
from ppcl.plan import Level
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.benchmark import score_model
from ppcl.toy.shapes_eval import CATEGORIES
from ppcl.toy.teacher import ToyTeacher


def sublevels(ids: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Sub-levels of a level's replacement ids (depth ids start with ``depth``, text runs ``text``, FFNs ``ffn``)."""
    depth = tuple(i for i in ids if i.startswith("depth"))
    text = tuple(i for i in ids if i.startswith("text"))
    ffn = tuple(i for i in ids if i.startswith("ffn"))
    out = {"depth": depth, "depth + FFNs": depth + ffn, "depth + text runs": depth + text}
    out.update({f"depth + {run}": depth + (run,) for run in text})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo folder")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--seeds", default="5,6", help="noise seeds (default held out from the demo's 0, 1)")
    args = parser.parse_args()
    teacher = ToyTeacher.load()
    model = teacher.transformer
    addon = PruningAddon.from_pretrained(args.run / "finetune" / "addon", model)
    extra = sublevels(addon.plan.level(TOP_LEVEL).replacement_ids)
    addon.plan = dataclasses.replace(addon.plan, levels=[*addon.plan.levels, *(Level(k, v) for k, v in extra.items())])
    seeds = tuple(int(s) for s in args.seeds.split(","))
    apply_addon(model, addon)
    try:
        lines = ["| level | removed | overall | " + " | ".join(CATEGORIES) + " |", "|---" * (3 + len(CATEGORIES)) + "|"]
        for name in [None, TOP_LEVEL, *extra]:
            set_level(model, name)
            s = score_model(teacher, transformer=model, n_per_category=args.per_category, seeds=seeds)
            removed = addon.plan.param_count(model.config, name).block_fraction_removed
            lines.append(
                f"| {name or 'teacher'} | {removed:.1%} | {s['overall']:.3f} | "
                + " | ".join(f"{s[c]:.3f}" for c in CATEGORIES)
                + " |"
            )
    finally:
        remove_addon(model)
    body = (
        f"Sub-levels of `{args.run}`'s top level, robust ShapesEval, {args.per_category} prompts per category "
        f"x seeds {seeds}.\n\n" + "\n".join(lines)
    )
    print(body)
    append("Width sub-levels of a trained demo add-on (toy teacher)", body)


if __name__ == "__main__":
    main()
