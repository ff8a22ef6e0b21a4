"""Evaluation of every level of an add-on against its teacher, on the same model object (levels switch in O(1)).

Per level: parameters and blocks, per-step latency ratio (interleaved timing), velocity agreement with the teacher
on fixed batches, guided agreement on paired cond/uncond batches (what the sampler integrates: guided-velocity and
guidance-direction NMSE, x0-prediction NMSE per time bucket), and on the toy world image PSNR to the teacher at equal
seeds, ShapesEval and R (mean relative drop of the task scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.eval.flops import forward_flops
from ppcl.eval.guided import (
    PSNR_SEEDS,
    Pair,
    guided_row,
    image_psnr,
    pair_inputs,
    paired_toy_batches,
    predict_pairs,
    psnr_images,
    psnr_prompts,
    teacher_guided_row,
)
from ppcl.eval.latency import interleaved_latency, ratios
from ppcl.eval.metrics import T_BUCKETS, TASKS, bucket_label, check_buckets, relative_drop, velocity_agreement
from ppcl.logging import get_logger
from ppcl.runtime import STATE_ATTR, active_level, apply_addon, remove_addon, set_level

log = get_logger("eval")
TEACHER = "teacher"
#: The toy sampler's guidance scale (:class:`ppcl.toy.sampler.SamplerConfig`), the default of the guided metrics.
DEFAULT_GUIDANCE = 4.0


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
    *,
    paired: Sequence[Pair] | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    t_buckets: Sequence[tuple[float, float]] = T_BUCKETS,
    psnr_per_category: int = 4,
    psnr_seeds: Sequence[int] = PSNR_SEEDS,
) -> dict[str, dict[str, Any]]:
    """Rows keyed by level name (``"teacher"`` first): params, FLOPs, latency, agreement, guided agreement and (toy)
    PSNR, ShapesEval + R.

    Keys of every row: ``params``, ``blocks``, ``block_params_removed``, ``flops``, ``flops_ratio``, ``latency_ms``,
    ``latency_ratio``, ``cosine`` / ``nmse`` (raw velocity on ``batches``); with pairs, the keys of
    :func:`ppcl.eval.metrics.guided_agreement` (``guided_nmse``, ``guided_cosine``, ``direction_nmse``,
    ``direction_cosine``, ``cond_nmse``, ``uncond_nmse``) and ``x0_nmse`` ``{"0.00-0.25": NMSE, ...}``; with
    ``toy``: ``psnr_db`` (None for the teacher), ``shapes_eval`` and ``R``.

    Args:
        model: the base transformer (the add-on is applied for the evaluation and removed afterwards if it was not
            applied before).
        addon: the add-on to evaluate.
        batches: fixed forward-kwargs batches for agreement; the first one is timed.
        levels: level names (default: all of the plan's).
        repeats: interleaved timing repeats.
        toy: a ToyTeacher for ShapesEval and PSNR (None: skip); ``shapes_eval`` are keyword arguments of
            :func:`ppcl.toy.benchmark.sample_benchmark` (e.g. ``{"n_per_category": 60}``).
        teacher_scores: the teacher's ShapesEval under the same protocol, when already known (not re-sampled).
        paired: (conditional, unconditional twin) batches for the guided metrics (see
            :func:`ppcl.eval.guided.uncond_twin`); default with ``toy``: :func:`ppcl.eval.guided.paired_toy_batches`
            (4 x 32, t stratified over ``t_buckets``), without: no guided metrics.
        guidance: classifier-free guidance scale g of ``v_g = v_u + g·(v_c − v_u)`` (use the sampler's); also the
            guidance of the sampled images (ShapesEval, PSNR) unless ``shapes_eval`` names a ``sampler``.
        t_buckets: time buckets of the x0-prediction NMSE.
        psnr_per_category: toy: 0 skips the PSNR. Otherwise, when the teacher's ShapesEval images are sampled here
            (no ``teacher_scores``), the PSNR is taken on every ShapesEval image pair at no extra sampling (equal
            prompts and noise); when they are not, on ``psnr_per_category`` prompts per category x ``psnr_seeds``
            sampled for it at ``guidance``.
        psnr_seeds: noise seeds of those separately sampled PSNR images.
    """
    check_buckets(t_buckets)
    levels = list(levels) if levels is not None else addon.plan.level_names
    if paired is None and toy is not None:
        paired = paired_toy_batches(toy, buckets=t_buckets)
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
        if paired:
            _guided(model, levels, rows, paired, guidance, t_buckets)
        for lv in [None, *levels]:
            set_level(model, lv)
            rows[_name(lv)]["flops"] = forward_flops(model, batches[0])
        for row in rows.values():
            row["flops_ratio"] = round(row["flops"] / rows[TEACHER]["flops"], 4)
        timing = interleaved_latency({_name(lv): _timed(model, lv, batches[0]) for lv in [None, *levels]}, repeats)
        for name, ratio in ratios(timing, TEACHER).items():
            rows[name].update(latency_ms=round(timing[name]["median_ms"], 3), latency_ratio=round(ratio, 4))
        if toy is not None:
            images = _shapes_eval(
                model, toy, [None, *levels], rows, _with_sampler(shapes_eval, guidance), teacher_scores
            )
            if psnr_per_category > 0 and TEACHER in images:
                _psnr_from(images, rows)
            elif psnr_per_category > 0:
                _psnr(model, toy, levels, rows, psnr_prompts(psnr_per_category), psnr_seeds, guidance)
    finally:
        if was_applied:
            set_level(model, previous)
        else:
            remove_addon(model)
    return rows


def _guided(
    model: nn.Module,
    levels: list[str],
    rows: dict,
    paired: Sequence[Pair],
    guidance: float,
    buckets: Sequence[tuple[float, float]],
) -> None:
    """Guided agreement of every level with the teacher on the same pairs (teacher predicted once)."""
    set_level(model, None)
    teacher = predict_pairs(model, paired)
    x_t, t = pair_inputs(paired)
    rows[TEACHER].update(teacher_guided_row([bucket_label(b) for b in buckets]))
    for lv in levels:
        set_level(model, lv)
        rows[lv].update(guided_row(predict_pairs(model, paired), teacher, x_t, t, guidance, buckets))


def _psnr(
    model: nn.Module, toy: Any, levels: list[str], rows: dict, prompts: list[str], seeds: Sequence[int], guidance: float
) -> None:
    """Image PSNR of every level to the teacher's images at equal prompts and noise seeds."""
    set_level(model, None)
    log.info("eval: PSNR images (%d prompts x %d seeds per level)", len(prompts), len(seeds))
    reference = psnr_images(toy, model, prompts, seeds, guidance)
    rows[TEACHER]["psnr_db"] = None  # identical images: PSNR is infinite, not a number JSON can hold
    for lv in levels:
        set_level(model, lv)
        rows[lv]["psnr_db"] = image_psnr(psnr_images(toy, model, prompts, seeds, guidance), reference)


def _with_sampler(kwargs: dict[str, Any] | None, guidance: float) -> dict[str, Any]:
    """ShapesEval keyword arguments whose sampler runs at ``guidance`` unless they name their own sampler."""
    from ppcl.toy.sampler import SamplerConfig

    return {"sampler": SamplerConfig(guidance=guidance), **(kwargs or {})}


def _psnr_from(images: dict[str, np.ndarray], rows: dict) -> None:
    """Image PSNR of every level to the teacher on the ShapesEval images (same prompts and noise seeds)."""
    rows[TEACHER]["psnr_db"] = None
    for name, level_images in images.items():
        if name != TEACHER:
            rows[name]["psnr_db"] = image_psnr(level_images, images[TEACHER])


def _static_row(model: nn.Module, addon: PruningAddon, level: str | None) -> dict[str, Any]:
    count = addon.plan.param_count(model.config, level)
    return {
        "params": count.after,
        "blocks": count.blocks_after,
        "block_params_removed": round(count.block_fraction_removed, 4),
    }


def _timed(model: nn.Module, level: str | None, batch: dict[str, Any]):
    def run() -> None:
        set_level(model, level)
        model(**batch, return_dict=False)

    return run


def _shapes_eval(
    model: nn.Module,
    toy: Any,
    levels: list[str | None],
    rows: dict,
    kwargs: dict[str, Any],
    teacher_scores: dict[str, Any] | None,
) -> dict[str, np.ndarray]:
    """ShapesEval and R of every level (the teacher re-sampled unless ``teacher_scores``); returns the sampled
    images ``(M, 32, 32, 3)`` by row name."""
    from ppcl.toy.benchmark import sample_benchmark, score_images

    if teacher_scores is not None:
        rows[TEACHER]["shapes_eval"] = dict(teacher_scores)
        levels = [lv for lv in levels if lv is not None]
    images: dict[str, np.ndarray] = {}
    for lv in levels:
        set_level(model, lv)
        log.info("eval: ShapesEval of %s", _name(lv))
        prompts, images[_name(lv)] = sample_benchmark(toy, transformer=model, **kwargs)
        rows[_name(lv)]["shapes_eval"] = score_images(prompts, images[_name(lv)])
    reference = rows[TEACHER]["shapes_eval"]
    for row in rows.values():
        row["R"] = round(relative_drop(row["shapes_eval"], reference), 4)
    return images


def strict_overall(shapes: dict[str, Any] | None) -> float | None:
    """The strict ShapesEval overall score beside the robust top-level one, when ``score_model`` reports it."""
    strict = (shapes or {}).get("strict")
    return strict.get("overall") if isinstance(strict, dict) else None


def _cell(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``; "—" where a row lacks the metric (the teacher's PSNR, an absent score)."""
    return "—" if value is None else format(value, spec)


def level_columns(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-level table; the guided, PSNR and ShapesEval columns appear when any
    row has them."""
    has = {key: any(key in r for r in rows.values()) for key in ("guided_nmse", "psnr_db", "shapes_eval")}
    header = [
        "level",
        "blocks",
        "params",
        "block params removed",
        "FLOPs ratio",
        "latency ratio",
        "velocity cosine",
        "velocity NMSE",
    ]
    if has["guided_nmse"]:
        header += ["guided NMSE", "direction NMSE", "direction cosine"]
    if has["psnr_db"]:
        header += ["PSNR (dB)"]
    if has["shapes_eval"]:
        header += ["ShapesEval overall", "strict overall", "single", "two objects", "position", "color", "R"]
    cells = []
    for name, r in rows.items():
        line = [
            name,
            str(r["blocks"]),
            f"{r['params'] / 1e6:.2f}M",
            f"{r['block_params_removed']:.1%}",
            f"{r['flops_ratio']:.3f}",
            _cell(r.get("latency_ratio"), ".3f"),
            f"{r['cosine']:.4f}",
            f"{r['nmse']:.4f}",
        ]
        if has["guided_nmse"]:
            line += [_cell(r.get(k), ".4f") for k in ("guided_nmse", "direction_nmse", "direction_cosine")]
        if has["psnr_db"]:
            line += [_cell(r.get("psnr_db"), ".2f")]
        if has["shapes_eval"]:
            s = r.get("shapes_eval") or {}
            line += [
                _cell(s.get("overall"), ".3f"),
                _cell(strict_overall(s), ".3f"),
                *(_cell(s.get(k), ".3f") for k in TASKS),
                _cell(r.get("R"), ".2%"),
            ]
        cells.append(line)
    return header, cells


def x0_columns(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the x0-prediction NMSE per time bucket (guided velocity); empty without pairs."""
    labels = next((list(r["x0_nmse"]) for r in rows.values() if "x0_nmse" in r), [])
    if not labels:
        return [], []
    header = ["level", *(f"t in {label}" for label in labels)]
    cells = [[name, *(_cell(r["x0_nmse"].get(k), ".4f") for k in labels)] for name, r in rows.items() if "x0_nmse" in r]
    return header, cells


def markdown(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of :func:`evaluate_levels` rows: the per-level table, then (with guided metrics) the
    x0-prediction NMSE per time bucket."""
    out = markdown(*level_columns(rows))
    header, cells = x0_columns(rows)
    if header:
        out += "\n\nx0-prediction NMSE vs the teacher per time bucket (guided velocity, x̂0 = x_t − t·v):\n\n"
        out += markdown(header, cells)
    return out
