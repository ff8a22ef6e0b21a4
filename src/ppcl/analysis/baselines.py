"""Baseline depth selectors, returned as :class:`~ppcl.analysis.intervals.Interval` lists for like-for-like comparison.

Baselines remove blocks *without* a student: each removed block ``i`` is ``Interval(i, i, student=False)`` (one block
dropped, ``.removed == 1``; see the conventions in :mod:`ppcl.analysis.intervals`). They are never merged into longer
runs, so the list says exactly which blocks each method picked; :func:`merge_adjacent` groups them when a runtime wants
fewer spans. Returned lists are in acceptance order, like :func:`~ppcl.plan.plan_from_intervals` accepts intervals, so a prefix
is a smaller pruning level.

* ShortGPT Block Influence: ``BI_i = mean over tokens of (1 − cos(x_{i−1}, x_i))``; drop the lowest-BI blocks.
* Uniform (TinyFusion-style "every other layer"): evenly spaced blocks.
* Random scattered blocks, seeded.

To train or evaluate a removed set with the depth machinery (students, plans, add-ons), :func:`spans_for_removed`
turns it into student spans: the kept block before each run of removed blocks absorbs the run. A fair comparison with
PPCL's spans (which may cover ``[protect_first, L − 1 − protect_last]`` and remove all but their first block) selects
removed blocks in ``[protect_first + 1, L − 1 − protect_last]``: exactly the blocks PPCL itself can remove.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ppcl.analysis.intervals import Interval
from ppcl.errors import ConfigError, PPCLError

__all__ = [
    "BlockInfluenceAccumulator",
    "every_other_layer",
    "merge_adjacent",
    "random_blocks",
    "select_by_influence",
    "spans_for_removed",
]


class BlockInfluenceAccumulator:
    """Streams ShortGPT's Block Influence of one block, ``BI = mean over tokens of (1 − cos(x_in, x_out))``.

    One accumulator per block (and stream); :meth:`value` of each, in block order, is what
    :func:`select_by_influence` takes. The running sum and count are two Python numbers, so it costs nothing to keep.

    Args:
        eps: guards the cosine of (near-)zero tokens.
    """

    def __init__(self, *, eps: float = 1e-12) -> None:
        self.eps = eps
        self.n_tokens = 0
        self._sum = 0.0

    def update(self, x_in: Tensor, x_out: Tensor, mask: Tensor | None = None) -> None:
        """Add tokens: the block's input ``x_in`` ``(..., D)`` and output ``x_out`` (same shape).

        ``mask``: optional boolean of the leading shape (``(N,)`` for ``(N, D)``); ``False`` tokens (padding) are
        skipped. Cosines are taken in float64.
        """
        if x_in.shape != x_out.shape or x_in.dim() < 1:
            raise PPCLError(
                "Block input and output shapes differ",
                expected="equal shapes (..., D)",
                found=f"{tuple(x_in.shape)} vs {tuple(x_out.shape)}",
            )
        a = x_in.reshape(-1, x_in.shape[-1]).to(torch.float64)
        b = x_out.reshape(-1, x_out.shape[-1]).to(device=a.device, dtype=torch.float64)
        if mask is not None:
            keep = mask.reshape(-1).to(device=a.device, dtype=torch.bool)
            if keep.shape[0] != a.shape[0]:
                raise PPCLError(
                    "The token mask does not match the tokens",
                    expected=f"{a.shape[0]} mask elements",
                    found=str(keep.shape[0]),
                )
            a, b = a[keep], b[keep]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(self.eps)
        self._sum += float((1.0 - cos).sum())
        self.n_tokens += int(a.shape[0])

    def merge(self, other: BlockInfluenceAccumulator) -> None:
        """Add ``other``'s tokens (e.g. another process's share of the same block)."""
        self._sum += other._sum
        self.n_tokens += other.n_tokens

    def value(self) -> float:
        """The Block Influence; NaN if no token was seen."""
        return self._sum / self.n_tokens if self.n_tokens else math.nan


def select_by_influence(
    bi: Tensor | Sequence[float], n_remove: int, first: int = 0, last: int | None = None
) -> list[Interval]:
    """Drop the ``n_remove`` blocks of lowest Block Influence in ``[first, last]`` (inclusive).

    Returns:
        ``Interval(i, i, student=False, score=BI_i)`` in ascending BI (ties: lower index first).
    """
    values = torch.as_tensor(bi, dtype=torch.float64).flatten()
    first, last = _range(len(values), first, last, n_remove)
    allowed = list(range(first, last + 1))
    if any(math.isnan(float(values[i])) for i in allowed):
        raise PPCLError(
            "Block Influence is undefined for an allowed block",
            expected="finite BI for every block in the allowed range",
            found=f"NaN at {[i for i in allowed if math.isnan(float(values[i]))]}",
            fix="feed every block's input and output to the accumulator",
        )
    ranked = sorted(allowed, key=lambda i: (float(values[i]), i))
    return [Interval(i, i, score=float(values[i]), student=False) for i in ranked[:n_remove]]


def every_other_layer(first: int, last: int, n_remove: int) -> list[Interval]:
    """Uniform removal: ``n_remove`` blocks evenly spread over ``[first, last]`` (inclusive), in index order.

    Block ``first + ⌊(j + ½) · n / n_remove⌋`` for ``j = 0..n_remove−1`` with ``n = last − first + 1``: when ``n_remove
    = n / 2`` this is every other block (``first + 1, first + 3, …``); distinct because the spacing is ≥ 1.
    """
    first, last = _range(last + 1, first, last, n_remove)
    n = last - first + 1
    picks = [first + ((2 * j + 1) * n) // (2 * n_remove) for j in range(n_remove)]
    return [Interval(i, i, student=False) for i in picks]


def random_blocks(first: int, last: int, n_remove: int, seed: int = 0) -> list[Interval]:
    """``n_remove`` distinct random blocks of ``[first, last]`` (inclusive), in draw order.

    Deterministic given ``seed``; with the same seed a smaller ``n_remove`` gives a prefix of a larger one.
    """
    first, last = _range(last + 1, first, last, n_remove)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(last - first + 1, generator=gen)[:n_remove]
    return [Interval(first + int(i), first + int(i), student=False) for i in order]


def merge_adjacent(intervals: Sequence[Interval]) -> list[Interval]:
    """Group dropped blocks into maximal runs: ``[3,3], [4,4], [7,7]`` → ``[3,4], [7,7]`` (all ``student=False``).

    Only for intervals without students (merging student intervals would change what they mean). Sorted by ``u``.
    """
    if any(i.student for i in intervals):
        raise PPCLError(
            "Only dropped blocks can be merged", expected="student=False intervals", found="a student interval"
        )
    blocks = sorted({b for i in intervals for b in range(i.u, i.v + 1)})
    runs: list[Interval] = []
    for b in blocks:
        if runs and runs[-1].v == b - 1:
            runs[-1] = Interval(runs[-1].u, b, student=False)
        else:
            runs.append(Interval(b, b, student=False))
    return runs


def spans_for_removed(removed: Iterable[Interval]) -> list[Interval]:
    """Student spans that remove exactly the blocks of ``removed``: each maximal run ``a..b`` → ``Interval(a − 1, b)``.

    The kept block ``a − 1`` before a run absorbs it: the span's student is initialised from block ``a − 1`` (init
    ``"first"``), so with an *untrained* student the span computes exactly "drop blocks ``a..b``", and distillation
    teaches it ``x_{a−2} → x_b``. This way a baseline's removed set runs through the same plans, add-ons and
    distillation as PPCL's intervals, with no separate "dropped block" runtime.

    Fairness: a span ``[a − 1, b]`` must avoid protected blocks, so with ``protect_first`` / ``protect_last`` of ``L``
    blocks only blocks in ``[protect_first + 1, L − 1 − protect_last]`` can be removed, the same range PPCL's spans
    remove from. Select baseline blocks in that range. On multi-stack models a run must also not start at a stack's
    first block (the block before it belongs to another stack); :func:`ppcl.analysis.propose.plan_from_removed` checks.

    Args:
        removed: dropped blocks (``student=False`` intervals, e.g. from :func:`select_by_influence`); duplicates and
            overlaps are merged.

    Returns:
        ``student=True`` intervals sorted by ``u``, score 0.0 (a removed set is taken whole, not ranked);
        ``sum(i.removed) == len(set of removed blocks)``.

    Raises:
        ConfigError: block 0 is removed (no block before it can absorb it).
        PPCLError: an input interval has a student.
    """
    runs = merge_adjacent(list(removed))
    if runs and runs[0].u == 0:
        raise ConfigError(
            "Block 0 cannot be removed as a student span",
            expected="removed blocks >= 1 (the block before a removed run absorbs it)",
            found=f"run {runs[0]} (inclusive)",
            fix="protect block 0: select removed blocks in [protect_first + 1, L - 1 - protect_last]",
        )
    return [Interval(run.u - 1, run.v, score=0.0) for run in runs]


def _range(n_blocks: int, first: int, last: int | None, n_remove: int) -> tuple[int, int]:
    last = n_blocks - 1 if last is None else last
    if not 0 <= first <= last < n_blocks:
        raise ConfigError(
            "The allowed block range is invalid",
            expected=f"0 <= first <= last < {n_blocks}",
            found=f"first={first}, last={last}",
        )
    if not 0 <= n_remove <= last - first + 1:
        raise ConfigError(
            "Cannot remove that many blocks from the allowed range",
            expected=f"0 <= n_remove <= {last - first + 1}",
            found=str(n_remove),
        )
    return first, last
