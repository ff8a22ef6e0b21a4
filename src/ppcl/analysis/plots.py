"""Plots of a RedundancyReport (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=_DPI)
    plt.close(fig)
    tmp.replace(path)
    return path


def cka_heatmap(cka: np.ndarray, intervals: Sequence[tuple[int, int]], path: Path, stream: str = "image") -> Path:
    """Heatmap of cka(u, k) (rows: start u, columns: end k), chosen intervals outlined."""
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    masked = np.ma.masked_invalid(cka)
    im = ax.imshow(masked, cmap="viridis", vmin=max(0.0, float(np.nanmin(cka))), vmax=1.0, origin="upper")
    for u, v in intervals:
        ax.add_patch(plt.Rectangle((v - 0.5, u - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    ax.set_xlabel("end block k (linearised u+1..k)")
    ax.set_ylabel("start block u (kept real)")
    ax.set_title(f"CKA(x_k, proxy z_u,k), {stream} tokens\nred: chosen intervals [u, v] (inclusive)")
    fig.colorbar(im, ax=ax, label="linear CKA")
    return _save(fig, path)


def delta_curves(cka: np.ndarray, intervals: Sequence[tuple[int, int]], path: Path) -> Path:
    """Δ(u, k) = cka(u, k−1) − cka(u, k) against k for every chosen start u; the chosen end v marked."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    cmap = plt.get_cmap("tab10")
    for n, (u, v) in enumerate(intervals):
        row = cka[u]
        ks = [k for k in range(u + 1, len(row)) if np.isfinite(row[k])]
        deltas = [row[k - 1] - row[k] for k in ks]
        color = cmap(n % 10)
        ax.plot(ks, deltas, marker="o", markersize=3, color=color, label=f"u={u} → v={v}")
        if v in ks:
            ax.scatter([v], [deltas[ks.index(v)]], s=60, facecolors="none", edgecolors=color, linewidths=1.5)
    ax.set_xlabel("end block k")
    ax.set_ylabel("Δ(u, k) = cka(u, k−1) − cka(u, k)")
    ax.set_title("First-order CKA drop per start u (circle: interval end v)")
    ax.grid(alpha=0.3)
    if intervals:
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path)


def depth_axis(
    num_blocks: int,
    intervals: Sequence[tuple[int, int]],
    accepted: Sequence[tuple[int, int]],
    protected: Sequence[int],
    path: Path,
) -> Path:
    """The depth axis: detected intervals (grey), intervals accepted by the plan (coloured), protected blocks."""
    fig, ax = plt.subplots(figsize=(8.0, 2.2))
    for i in range(num_blocks):
        color = "#d62728" if i in protected else "#dddddd"
        ax.add_patch(plt.Rectangle((i, 0.0), 0.9, 0.35, color=color))
    for u, v in intervals:
        ax.add_patch(plt.Rectangle((u, 0.45), v - u + 0.9, 0.25, color="#999999"))
    for n, (u, v) in enumerate(accepted):
        ax.add_patch(plt.Rectangle((u, 0.75), v - u + 0.9, 0.25, color=plt.get_cmap("tab10")(n % 10)))
        ax.text(u + (v - u + 0.9) / 2, 0.875, f"#{n + 1}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(-0.5, num_blocks + 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.175, 0.575, 0.875], ["blocks (red: protected)", "detected", "order (#1 = cheapest)"])
    ax.set_xticks(range(num_blocks))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("block index")
    ax.set_title("Contiguous intervals on the depth axis (inclusive [u, v])")
    return _save(fig, path)


def per_block(values: dict[str, np.ndarray], path: Path, title: str, ylabel: str, log: bool = False) -> Path:
    """Bar groups of one statistic per block, one series per stream (NaN = not applicable)."""
    fig, ax = plt.subplots(figsize=(8.0, 3.4))
    width = 0.8 / max(1, len(values))
    for n, (name, vals) in enumerate(values.items()):
        x = np.arange(len(vals)) + n * width - 0.4 + width / 2
        ax.bar(x, np.nan_to_num(vals, nan=0.0), width=width, label=name)
    ax.set_xlabel("block index")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def text_cka(matrix: np.ndarray, path: Path) -> Path:
    """CKA between text-stream features at every pair of depths (index 0 = embedded input)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xlabel("depth (0 = input, i+1 = after block i)")
    ax.set_ylabel("depth")
    ax.set_title("Text-stream CKA across depth\n(bright runs: text features barely change)")
    fig.colorbar(im, ax=ax, label="linear CKA")
    return _save(fig, path)
