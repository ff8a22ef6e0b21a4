"""The demo under other settings: each variant is ``run_demo`` with ``DemoConfig.full(**overrides)``.

Each ``--variant NAME:key=value,key=value`` runs into ``--out/NAME`` (a folder that already holds a finished run,
``results.json``, is read, not re-run) and one table is appended to benchmarks/RESULTS.md: per variant, the settings
that differ from the current defaults, the demo's wall time and, per level, block parameters removed, R (robust
ShapesEval), the strict R, the guided-velocity NMSE and the PSNR to the teacher.

    python benchmarks/demo_variants.py --out runs/variants \\
        --variant long:depth_steps=450,width_steps=200,finetune_steps=450,per_category=40 --variant default:
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _results import append
from budget_curve import _strict_r
from ppcl.demo import DemoConfig, run_demo
from ppcl.eval.levels import TEACHER


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:a=1,b=p40"`` → ``("name", {"a": 1, "b": "p40"})`` (ints, floats, ``None`` and strings)."""
    name, _, body = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        overrides[key] = _value(raw)
    return name, overrides


def _value(raw: str) -> Any:
    if raw == "None":
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def run_one(out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The results of the demo with ``overrides`` (run unless ``out`` holds them)."""
    if not (out / "results.json").exists():
        run_demo(out, DemoConfig.full(**overrides), command=f"python benchmarks/demo_variants.py ({overrides})")
    return json.loads((out / "results.json").read_text())


def table(runs: dict[str, dict[str, Any]]) -> str:
    defaults = asdict(DemoConfig.full())
    levels = [k for k in next(iter(runs.values()))["levels"] if k != TEACHER]
    head = (
        "| variant | settings that differ from the defaults | wall min | "
        + " | ".join(f"{lv} removed / R / strict R / guided NMSE / PSNR" for lv in levels)
        + " |"
    )
    lines = [head, "|---" * (3 + len(levels)) + "|"]
    for name, res in runs.items():
        diff = {k: v for k, v in res["config"].items() if defaults.get(k) != v}
        rows, cells = res["levels"], []
        for lv in levels:
            r, strict = rows[lv], _strict_r(rows[lv], rows[TEACHER])
            cells.append(
                f"{r['block_params_removed']:.1%} / {r['R']:.1%} / "
                f"{'—' if strict is None else f'{strict:.1%}'} / {r.get('guided_nmse', float('nan')):.3f} / "
                f"{r.get('psnr_db') or float('nan'):.1f}"
            )
        lines.append(
            f"| {name} | {diff or 'defaults'} | {res['timings']['total'] / 60:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (DemoConfig fields)")
    parser.add_argument("--out", default="runs/variants")
    parser.add_argument("--note", default="", help="a line of context written above the table")
    args = parser.parse_args()
    runs = {name: run_one(Path(args.out) / name, overrides) for name, overrides in map(parse_variant, args.variant)}
    body = (args.note + "\n\n" if args.note else "") + table(runs)
    print(body)
    append("Demo variants (toy teacher)", body)


if __name__ == "__main__":
    main()
