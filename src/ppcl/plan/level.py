"""A named level of a :class:`~ppcl.plan.plan.PruningPlan`: which replacements are active together, with the
interval scores that chose them (the budget guard's record)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ppcl.plan import _json


@dataclass(frozen=True)
class Level:
    """A named set of replacements that are active together (one pluggable variant).

    Attributes:
        name: unique level name (``"p40"``, ``"12B"``...).
        replacement_ids: ids of the active replacements.
        description: free text for humans.
        worst_score: the largest selection score among the level's depth intervals (``(1 − cka) / (v − u)`` for
            proposals), ``None`` when unknown (hand-made plans, plans written before this field existed).
        cheapest_score: the smallest such score, ``None`` when unknown; :meth:`score_ratio` is worst / cheapest.
    """

    name: str
    replacement_ids: tuple[str, ...] = ()
    description: str = ""
    worst_score: float | None = None
    cheapest_score: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "replacement_ids", tuple(self.replacement_ids))

    @property
    def score_ratio(self) -> float | None:
        """``worst_score / cheapest_score`` (``inf`` when the cheapest is 0), ``None`` when either is unknown."""
        if self.worst_score is None or self.cheapest_score is None:
            return None
        if self.cheapest_score <= 0:
            return 1.0 if self.worst_score <= 0 else math.inf
        return self.worst_score / self.cheapest_score

    def score_text(self) -> str:
        """``"worst interval score 0.00308 (3.5x the cheapest)"``, or ``""`` when the scores are unknown."""
        if self.worst_score is None:
            return ""
        ratio = self.score_ratio
        if ratio is None:
            versus = ""
        elif math.isinf(ratio):
            versus = " (the cheapest scores 0)"
        else:
            versus = f" ({ratio:.1f}x the cheapest)"
        return f"worst interval score {self.worst_score:.3g}{versus}"

    def to_json(self) -> dict[str, Any]:
        """JSON object of the level; the score fields are written only when known, so older plans stay byte-equal."""
        out: dict[str, Any] = {
            "name": self.name,
            "replacements": list(self.replacement_ids),
            "description": self.description,
        }
        if self.worst_score is not None:
            out["worst_score"] = self.worst_score
        if self.cheapest_score is not None:
            out["cheapest_score"] = self.cheapest_score
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "level") -> Level:
        """Inverse of :meth:`to_json`; malformed input raises :class:`~ppcl.errors.ArtefactError`."""
        obj = _json.object_at(data, where)
        ids = _json.require(obj, "replacements", list, where)
        return cls(
            name=_json.require(obj, "name", str, where),
            replacement_ids=tuple(_json.check(x, str, f"{where}.replacements[{i}]") for i, x in enumerate(ids)),
            description=_json.optional(obj, "description", str, where, ""),
            # Optional: plans written before the budget guard have no scores per level.
            worst_score=_optional_score(obj, "worst_score", where),
            cheapest_score=_optional_score(obj, "cheapest_score", where),
        )


def _optional_score(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    """``obj[key]`` as a float, ``None`` when absent or JSON ``null``."""
    if obj.get(key) is None:
        return None
    return _json.check(obj[key], float, f"{where}.{key}")


LevelRef = str | Level | None
"""A level by name, the level itself, or ``None`` for the original model (no replacement active)."""
