"""RedundancyReport: the analysis artefact (report.json + report.safetensors + plots/ + report.md)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppcl.analysis import plots
from ppcl.analysis.intervals import Interval, delta
from ppcl.errors import ArtefactError
from ppcl.io import atomic_folder, content_hash, load_tensors, read_json, save_tensors, write_json
from ppcl.outputs import REPORT

FORMAT_VERSION = 1
MANIFEST = "report.json"
WEIGHTS = "report.safetensors"
STREAMS = ("image", "text")


@dataclass
class RedundancyReport:
    """Per-stream redundancy statistics of a teacher and the contiguous intervals they suggest.

    Matrices are ``(L, L)`` over flat block indices (``cka[s][u, k]`` = cka(u, k), NaN where not computed);
    per-block vectors are ``(L,)`` (NaN where a block has no such stream or part). ``text_cka`` is ``(L+1, L+1)``
    over depths 0..L (0 = the embedded text entering block 0, i+1 = after block i). Intervals are inclusive [u, v].
    """

    arch: str
    model_class: str
    config_hash: str
    stack_sizes: list[int]
    calibration_hash: str
    settings: dict[str, Any]
    cka: dict[str, torch.Tensor]
    cka_used: torch.Tensor
    intervals: list[Interval]
    probe_rel_error: dict[str, np.ndarray]
    probe_mse: dict[str, np.ndarray]
    ffn_rel_error: dict[str, np.ndarray]
    ffn_mse: dict[str, np.ndarray]
    block_influence: dict[str, np.ndarray]
    text_cka: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return int(sum(self.stack_sizes))

    def protected(self) -> list[int]:
        """Blocks no interval may include (the protected ends)."""
        first, last = self.settings["protect_first"], self.settings["protect_last"]
        return [i for i in range(self.num_blocks) if i < first or i >= self.num_blocks - last]

    # ---------------------------------------------------------------------------------------------- persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"cka.{s}": self.cka[s] for s in STREAMS}
        out["cka.used"] = self.cka_used
        out["text_cka"] = torch.from_numpy(np.asarray(self.text_cka, dtype=np.float64))
        for name in ("probe_rel_error", "probe_mse", "ffn_rel_error", "ffn_mse", "block_influence"):
            for s in STREAMS:
                out[f"{name}.{s}"] = torch.from_numpy(np.asarray(getattr(self, name)[s], dtype=np.float64))
        return out

    def to_json(self) -> dict[str, Any]:
        """The manifest: everything but the matrices, plus per-block lists for readers without safetensors."""

        def vec(a: np.ndarray) -> list[float | None]:
            return [None if not math.isfinite(float(x)) else round(float(x), 6) for x in a]

        return {
            "format_version": FORMAT_VERSION,
            "kind": "ppcl.RedundancyReport",
            "arch": self.arch,
            "model_class": self.model_class,
            "config_hash": self.config_hash,
            "stack_sizes": self.stack_sizes,
            "calibration_hash": self.calibration_hash,
            "settings": self.settings,
            "stats": self.stats,
            "tensors_hash": content_hash(self._tensors()),
            "intervals_convention": "inclusive [u, v]; replaced by one student, v - u blocks removed",
            "intervals": [
                {
                    "u": i.u,
                    "v": i.v,
                    "cka": round(i.cka, 6),
                    "score": round(i.score, 6),
                    "removed": i.removed,
                    "span": f"[{i.u}:{i.v + 1}] (half-open)",
                }
                for i in self.intervals
            ],
            "per_block": {
                name: {s: vec(getattr(self, name)[s]) for s in STREAMS}
                for name in ("probe_rel_error", "ffn_rel_error", "block_influence")
            },
        }

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the report folder atomically: manifest, matrices, plots and report.md (an existing report is replaced
        only with ``overwrite``; any other existing folder is refused, :mod:`ppcl.outputs`)."""
        with atomic_folder(folder, REPORT, overwrite) as tmp:
            save_tensors(self._tensors(), tmp / WEIGHTS)
            write_json(self.to_json(), tmp / MANIFEST)
            figures = self.write_plots(tmp / "plots")
            (tmp / "report.md").write_text(self.markdown(figures))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> RedundancyReport:
        folder = Path(folder)
        m = read_json(folder / MANIFEST, "redundancy report")
        if m.get("kind") != "ppcl.RedundancyReport":
            raise ArtefactError(
                "not a redundancy report",
                expected="kind ppcl.RedundancyReport",
                found=str(m.get("kind")),
                fix="pass the folder written by `ppcl analyze`",
            )
        t = load_tensors(folder / WEIGHTS, "redundancy report")
        # Reports written before the hash existed (docs/example-report) have none and load as they are.
        if "tensors_hash" in m and content_hash(t) != m["tensors_hash"]:
            raise ArtefactError(
                "the report's matrices do not belong to its manifest",
                expected=f"tensors hash {str(m['tensors_hash'])[:16]}… (report.json)",
                found=f"{content_hash(t)[:16]}… in {folder / WEIGHTS}",
                fix="the files were mixed or modified; re-run `ppcl analyze`",
            )

        def per(name: str) -> dict[str, np.ndarray]:
            return {s: t[f"{name}.{s}"].numpy() for s in STREAMS}

        try:
            return cls._from_parts(m, t, per)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtefactError(
                "redundancy report is incomplete",
                expected="the fields written by `ppcl analyze`",
                found=f"missing or malformed {err} in {folder}",
                fix="re-run `ppcl analyze`",
            ) from err

    @classmethod
    def _from_parts(cls, m: dict[str, Any], t: dict[str, torch.Tensor], per: Any) -> RedundancyReport:
        intervals = [Interval(d["u"], d["v"], d["cka"], d["score"]) for d in m["intervals"]]
        return cls(
            m["arch"],
            m["model_class"],
            m["config_hash"],
            m["stack_sizes"],
            m["calibration_hash"],
            m["settings"],
            {s: t[f"cka.{s}"] for s in STREAMS},
            t["cka.used"],
            intervals,
            per("probe_rel_error"),
            per("probe_mse"),
            per("ffn_rel_error"),
            per("ffn_mse"),
            per("block_influence"),
            t["text_cka"].numpy(),
            m.get("stats", {}),
        )

    # -------------------------------------------------------------------------------------------------- output
    def write_plots(self, folder: Path, accepted: list[tuple[int, int]] | None = None) -> dict[str, str]:
        """Write every plot as PNG into ``folder``; returns {name: file name}."""
        folder.mkdir(parents=True, exist_ok=True)
        cka = self.cka_used.numpy()
        spans = [(i.u, i.v) for i in self.intervals]
        cheapest_first = [(i.u, i.v) for i in sorted(self.intervals, key=lambda x: (x.score, x.u))]
        made = {
            "cka_heatmap": plots.cka_heatmap(cka, spans, folder / "cka_heatmap.png", self.settings["cka_streams"]),
            "delta_curves": plots.delta_curves(cka, spans, folder / "delta_curves.png"),
            "depth_axis": plots.depth_axis(
                self.num_blocks,
                spans,
                accepted if accepted is not None else cheapest_first,
                self.protected(),
                folder / "depth_axis.png",
            ),
            "probe_errors": plots.per_block(
                self.probe_rel_error,
                folder / "probe_errors.png",
                "Residual linear probe fit error per block",
                "‖P(x) − y‖ / ‖y − x‖",
            ),
            "block_influence": plots.per_block(
                self.block_influence,
                folder / "block_influence.png",
                "ShortGPT Block Influence per block (low = redundant)",
                "BI = mean(1 − cos(x_in, x_out))",
            ),
            "ffn_fit": plots.per_block(
                self.ffn_rel_error,
                folder / "ffn_fit.png",
                "FFN half as a residual linear map: fit error per block",
                "relative error",
            ),
            "text_cka": plots.text_cka(self.text_cka, folder / "text_cka.png"),
        }
        return {name: path.name for name, path in made.items()}

    def markdown(self, figures: dict[str, str]) -> str:
        """report.md: a readable summary with the plots."""
        lines = [
            f"# Redundancy report — {self.model_class} ({self.num_blocks} blocks)",
            "",
            f"Calibration `{self.calibration_hash[:12]}`; settings: `{self.settings}`.",
            "",
            f"Analysis took {self.stats.get('seconds', '?')} s; peak RSS "
            f"{self.stats.get('peak_rss_mib', '?')} MiB; tokens seen {self.stats.get('tokens_seen')}, "
            f"cached for CKA {self.stats.get('tokens_cached')}.",
            "",
            "## Detected intervals (inclusive [u, v]; half-open code span [u:v+1])",
            "",
            "| interval | span (half-open) | blocks removed | cka(u, v) | score = (1 − cka)/(v − u) |",
            "|---|---|---|---|---|",
        ]
        for i in sorted(self.intervals, key=lambda x: (x.score, x.u)):
            lines.append(f"| [{i.u}, {i.v}] | [{i.u}:{i.v + 1}] | {i.removed} | {i.cka:.4f} | {i.score:.5f} |")
        lines += ["", "Rows are sorted cheapest first: the order in which a plan accepts them.", ""]
        captions = {
            "cka_heatmap": "cka(u, k): keep block u real, replace u+1..k by their linear probes.",
            "delta_curves": "Δ(u, k); an interval ends just before the drop starts growing again.",
            "depth_axis": "Intervals on the depth axis; protected blocks in red.",
            "probe_errors": "How linear each block is on average (lower = more linear).",
            "block_influence": "ShortGPT's per-block redundancy score, the baseline selector.",
            "ffn_fit": "How well each block's second half (norm → FFN → gate → residual) is a linear map.",
            "text_cka": "Text features across depth; bright runs are candidates for text-stream pruning.",
        }
        for name, file in figures.items():
            lines += [f"### {name.replace('_', ' ')}", "", captions.get(name, ""), "", f"![{name}](plots/{file})", ""]
        return "\n".join(lines)

    def delta_table(self) -> dict[int, list[float]]:
        """Δ(u, ·) for each interval start u (for inspection)."""
        return {i.u: delta(self.cka_used, i.u).tolist() for i in self.intervals}
