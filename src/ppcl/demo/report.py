"""``report.html`` of a demo run: one self-contained file (PNG figures embedded as base64 data URIs, no scripts, no
external resources), so it opens in any browser, offline, and can be mailed or attached as one file."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppcl.addon import PruningAddon
from ppcl.analysis import RedundancyReport
from ppcl.demo import figures
from ppcl.eval.levels import level_columns, x0_columns
from ppcl.io import write_text
from ppcl.plan import DepthReplacement, PruningPlan
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.sampler import sample
from ppcl.toy.teacher import ToyTeacher

GRID_PROMPTS = (
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green circle left of a red square",
    "a blue triangle above a yellow circle",
    "a red square and a green triangle",
    "a green square",
    "a yellow circle below a blue square",
)


@torch.no_grad()
def sample_rows(
    teacher: ToyTeacher, addon: PruningAddon, levels: Sequence[str], prompts: Sequence[str], seeds: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Images of the teacher and of every level on the same prompts and noise seeds.

    Returns:
        ``{"teacher" | level: uint8 (len(prompts) * seeds, 32, 32, 3)}`` and one caption per column.
    """
    columns = [p for p in prompts for _ in range(seeds)]
    noise = [7_000 + i for i in range(len(columns))]
    model = teacher.transformer
    apply_addon(model, addon)
    try:
        rows = {}
        for level in [None, *levels]:
            set_level(model, level)
            rows[level or "teacher"] = sample(teacher, columns, noise, transformer=model, show_progress=False)
    finally:
        remove_addon(model)
    return rows, columns


def make_figures(
    out: Path,
    result: Mapping[str, Any],
    report: RedundancyReport,
    plan: PruningPlan,
    grid: Mapping[str, np.ndarray],
    captions: Sequence[str],
) -> dict[str, Path]:
    """Every PNG of the report, under ``out / "figures"``."""
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    top = plan.level_names[-1]
    accepted = [r.span.inclusive for r in plan.replacements_of(top) if isinstance(r, DepthReplacement)]
    made = {k: folder / Path(v).name for k, v in report.write_plots(folder, accepted).items()}
    spans = {
        name: [r.span.inclusive for r in plan.replacements_of(name) if isinstance(r, DepthReplacement)]
        for name in plan.level_names
    }
    made["levels"] = figures.levels_on_depth_axis(
        report.num_blocks, result["level_blocks"], spans, folder / "levels.png"
    )
    made["training"] = figures.training_curves(
        {stage: out / stage / "metrics.jsonl" for stage in ("depth", "width", "finetune")}, folder / "training.png"
    )
    made["samples"] = figures.sample_grid(grid, captions, folder / "samples.png")
    return made


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def level_table(levels: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-level table: params, FLOPs, latency, raw and guided agreement, PSNR, ShapesEval
    (robust and strict overall, per category), R; a column a run did not measure is left out."""
    return level_columns(dict(levels))


def x0_table(levels: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the x0-prediction NMSE per time bucket (empty for a run without guided metrics)."""
    return x0_columns(dict(levels))


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.8em}.note{color:#555;font-size:0.9em}"""


def render_html(result: Mapping[str, Any], made: Mapping[str, Path], command: str) -> str:
    """The report page (a complete HTML5 document)."""
    cfg, teacher = result["config"], result["teacher"]
    header, rows = level_table(result["levels"])
    x0_header, x0_rows = x0_table(result["levels"])
    stage_levels = [k for k in result["stages"][0] if k != "stage"] if result["stages"] else []
    stage_rows = [[s["stage"], *(f"{s[lv]:.4f}" for lv in stage_levels)] for s in result["stages"]]
    timing_rows = [[k, f"{v:.1f} s"] for k, v in result["timings"].items()]
    t = teacher["config"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>ppcl demo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>ppcl demo: PPCL on the toy teacher</h1>",
        (
            f"<p>Teacher: diffusers <code>QwenImageTransformer2DModel</code>, {t['num_layers']} blocks, width "
            f"{t['num_attention_heads'] * t['attention_head_dim']}, {teacher['params'] / 1e6:.2f}M parameters, trained "
            f"{teacher['steps']} steps on ShapesWorld. Command: <code>{html.escape(command)}</code>.</p>"
        ),
        "<h2>Levels</h2>",
        (
            "<p class='note'>One training, three pluggable levels on the same base. Block params removed: share of "
            "the teacher's transformer-block parameters gone. Latency: one denoising step, interleaved timing, median, "
            "vs the teacher. Velocity cosine: agreement with the teacher's output on held-out noisy inputs. ShapesEval: "
            f"{cfg['per_category']} prompts per category x 2 seeds per level. R: mean relative drop of the four "
            "ShapesEval category scores vs the teacher (the paper's R).</p>"
        ),
        _table(header, rows),
        (
            "<p class='note'>Guided NMSE: ‖v_g − v_g(teacher)‖² / ‖v_g(teacher)‖² of the velocity the sampler integrates, "
            "v_g = v_u + g·(v_c − v_u), on captioned held-out inputs and their empty-prompt twins. Direction NMSE and "
            "cosine: the same for the guidance direction v_c − v_u, which carries prompt adherence (NMSE 1 = the prompt "
            "is ignored). PSNR: images sampled by the teacher and the level from the same prompts and noise seeds. "
            "Strict overall: ShapesEval's strict rule, when the run recorded it.</p>"
        ),
        *(
            [
                "<p class='note'>x0-prediction NMSE vs the teacher per time bucket (x̂0 = x_t − t·v_g, the image each "
                "sampler step heads for; a small velocity error at large t is a large error of x̂0):</p>",
                _table(x0_header, x0_rows),
            ]
            if x0_header
            else []
        ),
        "<h2>Sample grid (same prompts and seeds)</h2>",
        _img(made["samples"], "samples"),
        "<h2>Where the levels cut</h2>",
        _img(made["levels"], "levels on the depth axis"),
        "<h2>Redundancy analysis</h2>",
        (
            "<p class='note'>Linear CKA between the teacher's block output and the probe proxy that keeps block u "
            "and linearises u+1..k; intervals end where the first-order drop Δ starts growing again.</p>"
        ),
        _img(made["cka_heatmap"], "CKA heatmap"),
        _img(made["delta_curves"], "delta curves"),
        _img(made["depth_axis"], "intervals on the depth axis"),
        _img(made["text_cka"], "text-stream CKA"),
        _img(made["ffn_fit"], "FFN linear fit"),
        "<h2>Training</h2>",
        _img(made["training"], "training curves"),
        "<p class='note'>Velocity cosine of every level after each stage (held-out batches):</p>",
        _table(["after stage", *stage_levels], stage_rows),
        "<h2>Plan</h2>",
        f"<pre>{html.escape(result['plan'])}</pre>",
        "<h2>Run</h2>",
        _table(["stage", "wall time"], timing_rows),
        f"<pre>{html.escape(str(cfg))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_html(out: Path, result: Mapping[str, Any], made: Mapping[str, Path], command: str) -> Path:
    """Write ``out / "report.html"`` atomically."""
    return write_text(render_html(result, made, command), out / "report.html")
