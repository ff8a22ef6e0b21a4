"""``ppcl.analyze``: calibration set + teacher → RedundancyReport (Stage 1.1-1.2 of the method).

One streaming pass gathers probe statistics, Block Influence, FFN linear-fit statistics and a token cache
(:mod:`ppcl.analysis.collect`); everything else is computed from those: closed-form probes (optionally refined), CKA
trajectories cka(u, k) by chaining probes on cached tokens, Δ-rule intervals per block stack, text-stream CKA
across depth.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ppcl.analysis.cka import cka_matrix, cka_trajectories
from ppcl.analysis.collect import STREAMS, StreamStats, collect
from ppcl.analysis.intervals import Interval, scan_intervals
from ppcl.analysis.probe_refine import refine_probe
from ppcl.analysis.probes import ProbeAccumulator, ResidualProbe
from ppcl.analysis.report import RedundancyReport
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet
from ppcl.errors import ConfigError
from ppcl.io import config_hash
from ppcl.logging import get_logger

log = get_logger("analyze")


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of the analysis (all recorded in the report).

    Attributes:
        max_len: the Δ rule's length bound, in blocks per interval (paper: 10).
        protect_first, protect_last: blocks at each end that no interval may include.
        ridge: probe ridge term, relative to trace(XᵀX)/D.
        refine_steps: Adam refinement steps per probe on cached tokens (0 = closed form only).
        cka_streams: "image" (default) or "both" (mean of the image and text trajectories).
        cache_tokens: token positions per stream cached at every depth for CKA.
        batch_size: calibration samples per forward pass.
        seed: seeds the token subsampling and the probe refinement.
        delta_tol: a drop must exceed the previous one by more than this to end an interval; guards the Δ rule
            against float noise on (nearly) exactly linear runs, where every Δ is ~1e-9. Far below real Δs.
    """

    max_len: int = 10
    protect_first: int = 2
    protect_last: int = 2
    ridge: float = 1e-4
    refine_steps: int = 0
    cka_streams: str = "image"
    cache_tokens: int = 8192
    batch_size: int = 32
    seed: int = 0
    delta_tol: float = 1e-6

    def check(self, num_blocks: int) -> None:
        """Raise ConfigError for settings that cannot work on a model of ``num_blocks`` blocks."""
        if self.max_len < 2:
            raise ConfigError(
                "--max-len too small",
                expected=">= 2 (an interval spans at least 2 blocks)",
                found=str(self.max_len),
                fix="use the paper's default 10",
            )
        if self.cka_streams not in ("image", "both"):
            raise ConfigError("unknown --cka-streams", expected="image or both", found=self.cka_streams)
        if self.protect_first < 0 or self.protect_last < 0 or self.protect_first + self.protect_last > num_blocks - 2:
            raise ConfigError(
                "protected blocks leave nothing to prune",
                expected=f"protect_first + protect_last <= {num_blocks - 2}",
                found=f"{self.protect_first} + {self.protect_last}",
                fix="protect fewer blocks",
            )


def analyze(
    model: nn.Module, calibration: CalibrationSet, config: AnalysisConfig = AnalysisConfig()
) -> RedundancyReport:
    """Run the redundancy analysis of ``model`` (the teacher, eval mode) on ``calibration``."""
    spec = get_spec(model)
    calibration.check_model(model)
    num_blocks = spec.num_blocks(model)
    config.check(num_blocks)
    t0 = time.perf_counter()
    log.info("analyze: %s, %d blocks, %d calibration samples", spec.name, num_blocks, len(calibration))
    collected = collect(model, calibration, config.batch_size, config.cache_tokens, config.seed)
    t_pass = time.perf_counter() - t0
    probes, fits, ffn = {}, {}, {}
    for stream in STREAMS:
        probes[stream], fits[stream] = _fit_probes(collected.streams[stream], config)
        ffn[stream] = _fit_ffn(collected.streams[stream].ffn, config.ridge)
    cka = {s: _trajectories(collected.streams[s], probes[s], config.max_len) for s in STREAMS}
    combined = (
        cka["image"]
        if config.cka_streams == "image"
        else torch.nanmean(torch.stack([cka["image"], cka["text"]]), dim=0)
    )
    intervals = _scan_per_stack(combined, spec.stack_sizes(model), config)
    text_depths = [d for d in range(num_blocks + 1) if collected.streams["text"].cache[d]]
    text_cka = _text_cka(collected.streams["text"], text_depths, num_blocks)
    influence = {
        s: np.array([acc.value() if acc is not None else np.nan for acc in collected.streams[s].influence])
        for s in STREAMS
    }
    seconds = time.perf_counter() - t0
    log.info("analyze: %d intervals found in %.1f s (pass %.1f s)", len(intervals), seconds, t_pass)
    return RedundancyReport(
        arch=spec.name,
        model_class=type(model).__name__,
        config_hash=config_hash(dict(model.config)),
        stack_sizes=list(spec.stack_sizes(model)),
        calibration_hash=calibration.content_hash,
        settings=asdict(config),
        cka=cka,
        cka_used=combined,
        intervals=intervals,
        probe_rel_error={s: np.array([f[0] for f in fits[s]]) for s in STREAMS},
        probe_mse={s: np.array([f[1] for f in fits[s]]) for s in STREAMS},
        ffn_rel_error={s: np.array([f[0] for f in ffn[s]]) for s in STREAMS},
        ffn_mse={s: np.array([f[1] for f in ffn[s]]) for s in STREAMS},
        block_influence=influence,
        text_cka=text_cka,
        stats={
            "seconds": round(seconds, 2),
            "pass_seconds": round(t_pass, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tokens_seen": collected.tokens_seen,
            "tokens_cached": {s: _n_cached(collected.streams[s]) for s in STREAMS},
        },
    )


def _n_cached(stats: StreamStats) -> int:
    return int(sum(chunk.shape[0] for chunk in stats.cache[0]))


def _fit_probes(stats: StreamStats, config: AnalysisConfig) -> tuple[list[ResidualProbe | None], list[tuple]]:
    """Closed-form probe per block (optionally refined on cached tokens) and its (rel_error, mse)."""
    probes: list[ResidualProbe | None] = []
    fits: list[tuple[float, float]] = []
    for i, acc in enumerate(stats.probes):
        if acc is None:
            probes.append(None)
            fits.append((np.nan, np.nan))
            continue
        fit = acc.fit(config.ridge)
        probe = fit.probe
        if config.refine_steps > 0:
            probe = refine_probe(
                probe, stats.cached(i), stats.cached(i + 1), steps=config.refine_steps, seed=config.seed + i
            )
            refined = acc.fit_error(probe)
            fits.append((refined.rel_error, refined.mse))
        else:
            fits.append((fit.rel_error, fit.mse))
        probes.append(probe)
    return probes, fits


def _fit_ffn(accs: list[ProbeAccumulator | None], ridge: float) -> list[tuple[float, float]]:
    out = []
    for acc in accs:
        if acc is None:
            out.append((np.nan, np.nan))
        else:
            fit = acc.fit(ridge)
            out.append((fit.rel_error, fit.mse))
    return out


def _trajectories(stats: StreamStats, probes: list[ResidualProbe | None], max_len: int) -> torch.Tensor:
    """cka(u, k) over the blocks whose outputs exist for this stream; NaN elsewhere (SD3's text-less last block)."""
    num_blocks = len(probes)
    n = num_blocks
    while n > 0 and probes[n - 1] is None:
        n -= 1
    out = torch.full((num_blocks, num_blocks), float("nan"), dtype=torch.float64)
    if n < 2:
        return out
    outputs = [stats.cached(i + 1).float() for i in range(n)]
    out[:n, :n] = cka_trajectories(outputs, probes[:n], max_len)
    return out


def _scan_per_stack(cka: torch.Tensor, sizes: list[int], config: AnalysisConfig) -> list[Interval]:
    """Δ-rule intervals, scanned separately in each stack (a student is one block of one kind)."""
    total = sum(sizes)
    intervals: list[Interval] = []
    start = 0
    for size in sizes:
        first = max(start, config.protect_first)
        last = min(start + size - 1, total - 1 - config.protect_last)
        if last - first >= 1:
            intervals.extend(scan_intervals(cka, config.max_len, first=first, last=last, tol=config.delta_tol))
        start += size
    return intervals


def _text_cka(stats: StreamStats, depths: list[int], num_blocks: int) -> np.ndarray:
    """CKA between text features at every pair of depths 0..L (0 = embedded input); NaN where absent."""
    out = np.full((num_blocks + 1, num_blocks + 1), np.nan)
    if len(depths) >= 2:
        matrix = cka_matrix([stats.cached(d).float() for d in depths]).numpy()
        idx = np.array(depths)
        out[np.ix_(idx, idx)] = matrix
    return out
