"""Choosing width replacements from a RedundancyReport, and adding them to a plan as a level.

* Text runs (:func:`select_text_runs`): the report's ``text_cka`` is ``(L+1, L+1)`` over depths ``0..L`` (depth 0 is
  the text entering block 0, depth ``i + 1`` the text after block ``i``). A run ``[a, b]`` (inclusive blocks) replaces
  the text after blocks ``a+1..b`` by the anchor's output (depth ``a + 1``) and its linear maps, so it is accepted when
  ``cka(a+1, k) >= threshold`` for every ``k`` in ``a+2..b+1``; runs are grown maximally, scanning left to right, and do
  not overlap.

  Default threshold 0.95. Linear CKA is invariant to rotations and isotropic scaling only, so a value close to 1 means
  the later features are an almost orthogonal, uniformly scaled copy of the anchor's: exactly what a residual linear map
  ``z + Wz + b`` represents easily. 0.95 keeps the unexplained part of the (centred) similarity under 5 %, the same
  order as the per-layer CKA drops the depth stage tolerates inside its intervals; lower values admit runs whose
  text features rotate in ways one linear map per block must absorb. It is a knob, not a law: the paper gives no value.
* FFN blocks (:func:`select_ffn_blocks`): the ``k`` blocks whose replaced second halves have the lowest linear-fit
  relative error (``ffn_rel_error``); a block's score is the worst error over the streams it would replace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ppcl.errors import ConfigError
from ppcl.plan.plan import Level, PruningPlan
from ppcl.plan.replacements import DepthReplacement, Replacement
from ppcl.plan.width import FFNLinear, TextRun

if TYPE_CHECKING:
    from ppcl.analysis.report import RedundancyReport

DEFAULT_TEXT_CKA_THRESHOLD = 0.95


def dual_stream_blocks(arch: str, stack_sizes: Sequence[int]) -> list[int]:
    """Flat blocks where width replacements can apply: dual-stream stacks only, without SD3's text-less last block."""
    from ppcl.arch import spec_by_name

    spec = spec_by_name(arch)
    out, start = [], 0
    for stack, size in zip(spec.stacks, stack_sizes, strict=True):
        if stack.dual_stream:
            out += list(range(start, start + size))
        start += size
    if spec.protect_last_block and out and out[-1] == start - 1:
        out.pop()  # its text output is None (`context_pre_only`): no text stream to carry through a run
    return out


def select_width(
    report: RedundancyReport,
    *,
    threshold: float = DEFAULT_TEXT_CKA_THRESHOLD,
    ffn_k: int = 3,
    max_run_blocks: int | None = None,
) -> tuple[list[tuple[int, int]], list[FFNLinear]]:
    """Text runs (inclusive ``(a, b)``) and FFN blocks from a report, restricted to :func:`dual_stream_blocks`."""
    allowed = dual_stream_blocks(report.arch, report.stack_sizes)
    runs = select_text_runs(report.text_cka, threshold, max_blocks=max_run_blocks, allowed=allowed)
    pruned = [j for a, b in runs for j in range(a + 1, b + 1)]
    return runs, select_ffn_blocks(report.ffn_rel_error, ffn_k, text_pruned=pruned, allowed=allowed)


def select_text_runs(
    text_cka: np.ndarray,
    threshold: float = DEFAULT_TEXT_CKA_THRESHOLD,
    *,
    min_blocks: int = 2,
    max_blocks: int | None = None,
    allowed: Iterable[int] | None = None,
) -> list[tuple[int, int]]:
    """Maximal non-overlapping runs ``(a, b)`` (inclusive flat blocks) where text CKA from the anchor stays high.

    Args:
        text_cka: ``(L+1, L+1)`` text-stream CKA across depths (NaN = unknown, never accepted).
        threshold: minimum ``cka(a+1, k)`` for every later depth ``k`` of the run.
        min_blocks: shortest run kept (2: an anchor and one pruned block).
        max_blocks: longest run (``None``: unbounded).
        allowed: flat blocks a run may contain (e.g. one dual-stream stack, without SD3's text-less last block);
            default all blocks.

    Raises:
        ConfigError: a malformed matrix or threshold.
    """
    cka = np.asarray(text_cka, dtype=np.float64)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1] or cka.shape[0] < 2:
        raise ConfigError(
            "The text CKA matrix is malformed",
            expected="a square (L+1, L+1) matrix, L >= 1",
            found=str(cka.shape),
            fix="pass RedundancyReport.text_cka",
        )
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(
            "The text-run CKA threshold is out of range", expected="0 < threshold <= 1", found=str(threshold)
        )
    num_blocks = cka.shape[0] - 1
    ok = set(range(num_blocks)) if allowed is None else {int(i) for i in allowed}
    runs: list[tuple[int, int]] = []
    a = 0
    while a < num_blocks:
        b = a
        while (
            b + 1 < num_blocks
            and b + 1 in ok
            and a in ok
            and (max_blocks is None or b + 1 - a + 1 <= max_blocks)
            and np.isfinite(cka[a + 1, b + 2])
            and cka[a + 1, b + 2] >= threshold
        ):
            b += 1
        if b - a + 1 >= min_blocks:
            runs.append((a, b))
            a = b + 1
        else:
            a += 1
    return runs


def select_ffn_blocks(
    ffn_rel_error: Mapping[str, np.ndarray],
    k: int,
    *,
    text_pruned: Iterable[int] = (),
    allowed: Iterable[int] | None = None,
) -> list[FFNLinear]:
    """The ``k`` blocks whose FFN second halves are most linear, as :class:`FFNLinear` replacements (block order).

    Args:
        ffn_rel_error: per stream, ``(L,)`` relative least-squares error of ``g ↦ second-half output`` (NaN = none).
        k: how many blocks.
        text_pruned: flat blocks whose text stream is pruned: only their image FFN is replaced (and scored).
        allowed: flat blocks that may be chosen (default all with a finite score).
    """
    if k < 0:
        raise ConfigError("The number of FFN blocks is negative", expected="k >= 0", found=str(k))
    image = np.asarray(ffn_rel_error["image"], dtype=np.float64)
    text = np.asarray(ffn_rel_error.get("text", np.full_like(image, np.nan)), dtype=np.float64)
    pruned = {int(i) for i in text_pruned}
    ok = set(range(len(image))) if allowed is None else {int(i) for i in allowed}
    scored: list[tuple[float, int, tuple[str, ...]]] = []
    for i in sorted(ok):
        streams = ("image",) if i in pruned or not np.isfinite(text[i]) else ("image", "text")
        errors = [image[i]] + ([text[i]] if "text" in streams else [])
        if all(np.isfinite(errors)):
            scored.append((max(errors), i, streams))
    chosen = sorted(scored)[:k]
    return [FFNLinear(i, streams) for _, i, streams in sorted(chosen, key=lambda t: t[1])]


def with_width_level(
    plan: PruningPlan,
    name: str,
    text_runs: Sequence[tuple[int, int]],
    ffn_blocks: Sequence[int | FFNLinear],
    base_level: str | None = None,
    description: str = "",
) -> PruningPlan:
    """A copy of ``plan`` with a new level ``name`` = ``base_level``'s replacements + the given width replacements.

    Text runs are inclusive ``(a, b)``; their ``skip`` is set to the blocks ``base_level``'s depth spans remove inside
    them (the paper: depth-removed layers inside a run are skipped). An FFN block given as an int replaces the image
    FFN, and the text FFN too unless a run prunes that block's text stream. Replacements equal to existing ones are
    reused (same id), so several levels can share them.
    """
    base = plan.replacements_of(base_level) if base_level is not None else []
    gone = {i for r in base if isinstance(r, DepthReplacement) for i in r.removed_blocks()}
    runs = [TextRun.from_inclusive(a, b, skip=sorted(gone & set(range(a + 1, b)))) for a, b in text_runs]
    pruned = {j for r in runs for j in r.pruned_blocks()}
    ffns = [
        f if isinstance(f, FFNLinear) else FFNLinear(int(f), ("image",) if f in pruned else ("image", "text"))
        for f in ffn_blocks
    ]
    replacements = list(plan.replacements)
    by_id = {r.id: r for r in replacements}
    width: list[Replacement] = []
    for rep in [*runs, *ffns]:
        existing = by_id.get(rep.id)
        if existing is not None and existing != rep:
            # Same default id, different content (e.g. another skip set): give it a distinct id.
            rep = dataclasses.replace(rep, id=f"{rep.id}@{name}")
        if rep.id not in by_id:
            replacements.append(rep)
            by_id[rep.id] = rep
        width.append(rep)
    # The depth intervals are the base level's, so are their scores (width replacements have none).
    scored = plan.level(base_level) if base_level is not None else Level(name)
    level = Level(
        name,
        tuple(r.id for r in base) + tuple(r.id for r in width),
        description,
        worst_score=scored.worst_score,
        cheapest_score=scored.cheapest_score,
    )
    return dataclasses.replace(plan, replacements=replacements, levels=[*plan.levels, level]).validate()
