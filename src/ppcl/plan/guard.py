"""The budget guard of planning (METHOD.md, "Beyond the paper"): a target may not force in an interval far worse than
the ones already accepted.

An interval scoring more than ``factor`` times the largest accepted score is refused; :mod:`ppcl.plan.propose` then
stops the acceptance order there and the levels that needed it undershoot their targets, with a note saying so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ppcl.errors import ConfigError

DEFAULT_GUARD_FACTOR = 10.0
"""An interval scoring more than this many times the largest accepted score is refused (0 = no guard).

Why 10: on the committed toy teacher (docs/example-report) the cheapest-first scores are 0.00088, 0.00212, 0.00308,
then 0.0582: the step from one accepted interval to the next is at most 2.4x, the interval a 40 % target forced in
([2, 4]) is 18.9x the largest accepted score (66x the cheapest). Five more toy calibrations (32 prompts with noise
seed 1; 4, 6 and 8 prompts; 4 prompts x 2 steps) give accepted steps of at most 4x, and [2, 4] at 14-19x. METHOD.md
reports the pattern on the public Qwen-Image plan: forced intervals 20-60x the others (its per-interval scores are not
published). 10 lies between the two groups: 2.5x above the largest accepted step, below every forced interval seen.
"""

DEFAULT_GUARD_FLOOR = 1e-3
"""The guard's reference is never below this score (CKA lost per removed block).

Why: the reference is a measured score and can be almost 0 (an interval whose CKA is 1 to four digits); a ratio to
such a number refuses harmless intervals (score 1e-4 after 1e-6 is 100x but loses 0.01 % CKA per block). With the
floor, nothing scoring at most ``factor x 0.001`` (1 % CKA per removed block at the default factor) is refused.
It does not bind on the toy teacher, whose reference is 0.003 when the guard trips.
"""


@dataclass(frozen=True)
class BudgetGuard:
    """Refuses an interval whose score exceeds ``factor x max(largest accepted score, floor)``.

    The reference is the largest score accepted so far, i.e. the previous interval of the cheapest-first order: the
    guard looks for a jump in the sorted scores. The largest rather than the median (or the cheapest): the accepted
    intervals were all judged good enough, so the question is whether the next one is an outlier against the worst of
    them; a median or minimum would let one exceptionally cheap interval (score near 0) make every later ordinary one
    look expensive. The first interval has no reference and is always allowed; there is no absolute ceiling on scores,
    because what score is "too bad" depends on the model, and the per-level worst score in the plan's summary shows it.

    Attributes:
        factor: the allowed ratio; 0 disables the guard.
        floor: the smallest reference (see :data:`DEFAULT_GUARD_FLOOR`).
    """

    factor: float = DEFAULT_GUARD_FACTOR
    floor: float = DEFAULT_GUARD_FLOOR

    @classmethod
    def of(cls, factor: float, floor: float) -> BudgetGuard:
        """A checked guard; ``factor`` 0 or ``inf`` is the disabled guard (stored as 0)."""
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not (factor == 0 or factor >= 1):
            raise ConfigError(
                f"Invalid budget guard factor {factor!r}",
                expected="0 (no guard) or a number >= 1 (a factor below 1 would refuse every interval after the first)",
                found=repr(factor),
                fix=f"pass e.g. --guard-factor {DEFAULT_GUARD_FACTOR:g}, or 0 to disable the guard",
            )
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor < math.inf:
            raise ConfigError(
                f"Invalid budget guard floor {floor!r}",
                expected="a finite number >= 0",
                found=repr(floor),
                fix=f"pass e.g. guard_floor={DEFAULT_GUARD_FLOOR:g}",
            )
        return cls(0.0 if math.isinf(factor) else float(factor), float(floor))

    @property
    def enabled(self) -> bool:
        """Whether the guard refuses anything."""
        return self.factor > 0

    def limit(self, accepted_scores: Sequence[float]) -> float:
        """The largest score the next interval may have (``inf``: anything goes)."""
        if not self.enabled or not accepted_scores:
            return math.inf
        return self.factor * max(max(accepted_scores), self.floor)


@dataclass(frozen=True)
class Refusal:
    """The interval the guard refused: its score, the reference it was compared with, and the guard's settings."""

    inclusive: tuple[int, int]
    score: float
    reference: float
    factor: float
    floor: float

    @property
    def ratio(self) -> float:
        """Score over the largest accepted score (``inf`` when that is 0)."""
        return self.score / self.reference if self.reference > 0 else math.inf

    @property
    def limit(self) -> float:
        """The largest score the guard allowed."""
        return self.factor * max(self.reference, self.floor)

    def text(self) -> str:
        """``"[2, 4] (score 0.0582 = 18.9x the largest accepted score 0.00308; limit 10x)"``."""
        u, v = self.inclusive
        limit = f"{self.factor:g}x"
        if self.reference < self.floor:
            limit += f" the guard floor {self.floor:g}"
        return (
            f"[{u}, {v}] (score {self.score:.3g} = {self.ratio:.1f}x the largest accepted score "
            f"{self.reference:.3g}; limit {limit})"
        )

    def to_json(self) -> dict[str, Any]:
        """The provenance record (``ratio`` is ``null`` when the reference is 0)."""
        ratio = self.ratio
        return {
            "inclusive": list(self.inclusive),
            "score": self.score,
            "reference": self.reference,
            "ratio": ratio if math.isfinite(ratio) else None,
            "limit": self.limit,
        }


def check_guard(guard_factor: float = DEFAULT_GUARD_FACTOR, guard_floor: float = DEFAULT_GUARD_FLOOR) -> BudgetGuard:
    """The budget guard for these settings; raises :class:`~ppcl.errors.ConfigError` on a bad value.

    The CLI calls it before any analysis runs, so a bad ``--guard-factor`` fails at once.
    """
    return BudgetGuard.of(guard_factor, guard_floor)
