"""The demo's own figures (the analysis figures come from :meth:`RedundancyReport.write_plots`): levels on the depth
axis, training curves, and the teacher-vs-levels sample grid. PNG files, matplotlib's Agg backend."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ppcl.analysis.plots import _save

_COLORS = {
    "kept": "#cfd8dc",
    "removed": "#d62728",
    "text_pruned": "#1f77b4",
    "ffn_linear": "#2ca02c",
    "student": "#ff7f0e",
}


def levels_on_depth_axis(
    num_blocks: int,
    level_blocks: Mapping[str, Mapping[str, Sequence[int]]],
    spans: Mapping[str, Sequence[tuple[int, int]]],
    path: Path,
) -> Path:
    """One row per level: each block kept, replaced by a span's student (orange), removed (red); text-pruned
    (blue stripe) and FFN → linear (green stripe) blocks marked.

    Args:
        num_blocks: teacher blocks.
        level_blocks: per level ``{"removed": [...], "text_pruned": [...], "ffn_linear": [...]}``, flat indices.
        spans: per level, its depth spans as inclusive ``(u, v)``.
    """
    names = list(level_blocks)
    fig, ax = plt.subplots(figsize=(8.4, 0.75 * len(names) + 1.2))
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        blocks = level_blocks[name]
        students = {u for u, _ in spans.get(name, ())}
        for i in range(num_blocks):
            color = (
                _COLORS["removed"]
                if i in blocks["removed"]
                else (_COLORS["student"] if i in students else _COLORS["kept"])
            )
            ax.add_patch(plt.Rectangle((i, y + 0.15), 0.9, 0.7, color=color))
            if i in blocks["text_pruned"]:
                ax.add_patch(plt.Rectangle((i, y + 0.15), 0.9, 0.18, color=_COLORS["text_pruned"]))
            if i in blocks["ffn_linear"]:
                ax.add_patch(plt.Rectangle((i, y + 0.67), 0.9, 0.18, color=_COLORS["ffn_linear"]))
        for u, v in spans.get(name, ()):
            ax.add_patch(
                plt.Rectangle((u - 0.05, y + 0.1), v - u + 1.0, 0.8, fill=False, edgecolor="black", linewidth=1.2)
            )
    ax.set_xlim(-0.3, num_blocks + 0.1)
    ax.set_ylim(0, len(names))
    ax.set_yticks([len(names) - 1 - r + 0.5 for r in range(len(names))], names)
    ax.set_xticks([i + 0.45 for i in range(num_blocks)], [str(i) for i in range(num_blocks)], fontsize=7)
    ax.set_xlabel("teacher block")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(
        handles,
        ["kept", "removed", "text stream pruned", "FFN → linear", "student (span start)"],
        fontsize=7,
        ncol=5,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        frameon=False,
    )
    ax.set_title("Levels on the depth axis (black boxes: depth spans [u, v], inclusive)")
    return _save(fig, path)


def training_curves(metrics: Mapping[str, Path], path: Path) -> Path:
    """Loss against step for each training stage (``metrics.jsonl`` of each), log scale, one panel per stage."""
    present = {k: v for k, v in metrics.items() if v.is_file()}
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(3.6 * max(1, len(present)), 3.0), squeeze=False)
    for ax, (stage, file) in zip(axes[0], present.items(), strict=False):
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#1f77b4")
        ax.set_yscale("log")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    return _save(fig, path)


def sample_grid(rows: Mapping[str, np.ndarray], captions: Sequence[str], path: Path) -> Path:
    """Images of each model (one row each) on the same prompts and noise seeds.

    Args:
        rows: ``{model name: uint8 (N, H, W, 3)}``, the same N prompts/seeds in the same order for every model.
        captions: one per column.
    """
    names = list(rows)
    n = len(captions)
    fig, axes = plt.subplots(len(names), n, figsize=(1.25 * n + 0.8, 1.3 * len(names) + 0.6), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(rows[name][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0 and (c == 0 or captions[c] != captions[c - 1]):
                # One title per prompt (its seeds follow in the next columns), wrapped to the column width.
                ax.set_title("\n".join(textwrap.wrap(captions[c], 18)), fontsize=7, loc="left")
    return _save(fig, path)
