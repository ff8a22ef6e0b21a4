"""What the stage-3 fine-tune optimises (METHOD.md "Guided-output fine-tune"): :class:`FinetuneObjective`.

The sampler does not use the raw velocity: with classifier-free guidance it uses ``v_g = v_u + g·(v_c − v_u)``, and
the guidance direction ``d = v_c − v_u`` carries prompt adherence. A pruned model whose raw velocity agrees to cosine
0.97 can get ``d`` wrong by more than ``d`` itself (measured on the toy: direction NMSE 1.42). The guided objective
trains on *paired* inputs (each sample once with its prompt, once with the empty prompt, same ``x_t`` and ``t``):

* ``output``: MSE of the pruned vs the teacher output on the conditional half (the plain stage-3 loss) and, when paired,
  on the unconditional half too;
* ``guided``: MSE of the guided velocities ``v_g`` at ``guidance``;
* ``direction``: MSE of the guidance directions ``d``.

Several levels can train at once, so that fine-tuning the largest level does not make the smaller ones, which share
its students, worse: ``level_mode="all"`` sums every level's terms on every batch (one teacher pass, one pruned pass
per level), ``"draw"`` trains one level per micro-batch, drawn from (seed, micro-batch index) so a resumed run draws
the same levels.

``on_policy`` replaces a share of each batch's noisy inputs by states of the pruned model's own sampler (a short
guided Euler run from pure noise down to the batch's ``t``): what the pruned model meets when it samples, where its own
earlier errors have moved ``x_t``. It needs a flow-matching data source (``x_t = (1 − t)·x0 + t·ε``, the timestep is
``t`` in [0, 1]; the toy world).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
from torch import Tensor

from ppcl.errors import ConfigError

LevelMode = Literal["all", "draw"]
LEVEL_MODES: tuple[str, ...] = get_args(LevelMode)


@dataclass(frozen=True)
class FinetuneObjective:
    """Loss terms and levels of a fine-tune.

    Attributes:
        guidance: the sampler's guidance scale ``g``; ``None`` trains on the batches as given (no pairing) and only
            ``output_weight`` counts.
        output_weight, guided_weight, direction_weight: weights of the three terms (module docstring).
        levels: the levels to fine-tune together; empty = only the ``level`` given to ``finetune``.
        level_mode: ``"all"`` (sum over levels each batch) or ``"draw"`` (one level per micro-batch).
        on_policy: share of each batch whose ``x_t`` comes from the pruned model's own guided sampler.
        on_policy_steps: Euler steps of that sampler from ``t = 1`` to the batch's ``t``.
        seed: of the level draws and of the on-policy noise.
    """

    guidance: float | None = None
    output_weight: float = 1.0
    guided_weight: float = 1.0
    direction_weight: float = 0.0
    levels: tuple[str, ...] = ()
    level_mode: LevelMode = "all"
    on_policy: float = 0.0
    on_policy_steps: int = 4
    seed: int = 0

    def validate(self) -> FinetuneObjective:
        """Raise :class:`ConfigError` on the first out-of-range value; return ``self``."""
        checks: list[tuple[bool, str, str, Any]] = [
            (self.guidance is None or self.guidance >= 0, "guidance", ">= 0 or None", self.guidance),
            (
                min(self.output_weight, self.guided_weight, self.direction_weight) >= 0,
                "weights",
                ">= 0",
                (self.output_weight, self.guided_weight, self.direction_weight),
            ),
            (self.level_mode in LEVEL_MODES, "level_mode", f"one of {LEVEL_MODES}", self.level_mode),
            (0.0 <= self.on_policy <= 1.0, "on_policy", "in [0, 1]", self.on_policy),
            (self.on_policy_steps >= 1, "on_policy_steps", ">= 1", self.on_policy_steps),
            (
                self.on_policy == 0 or self.guidance is not None,
                "on_policy",
                "0 unless guidance is set (the pruned sampler runs guided)",
                self.on_policy,
            ),
        ]
        for ok, name, expected, found in checks:
            if not ok:
                raise ConfigError(f"fine-tune objective `{name}` is out of range", expected=expected, found=repr(found))
        guided = self.guidance is not None and (self.guided_weight > 0 or self.direction_weight > 0)
        if self.output_weight == 0 and not guided:
            raise ConfigError(
                "the fine-tune objective has no active term",
                expected="output_weight > 0, or a guidance scale with a guided or direction weight > 0",
                found=f"output_weight 0, guidance {self.guidance}, guided_weight {self.guided_weight}, "
                f"direction_weight {self.direction_weight}",
                fix="set output_weight > 0, or guidance=G (the sampler's scale) with a guided weight",
            )
        return self

    @property
    def paired(self) -> bool:
        """Whether batches are paired with their unconditional twins."""
        return self.guidance is not None

    def draw(self, levels: Sequence[str], index: int) -> list[str]:
        """The levels trained on micro-batch ``index``: all of them, or one drawn from (seed, index)."""
        if self.level_mode == "all" or len(levels) == 1:
            return list(levels)
        return [levels[int(np.random.default_rng([self.seed, index, 7]).integers(len(levels)))]]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "levels": list(self.levels)}


def guided_terms(
    pruned: tuple[Tensor, Tensor | None], teacher: tuple[Tensor, Tensor | None], objective: FinetuneObjective
) -> dict[str, Tensor]:
    """The weighted terms of one level: ``{"output", "guided", "direction"}`` (zero-weight terms left out).

    Args:
        pruned: the pruned model's ``(v_c, v_u)``, each ``(B, N, C)``; ``v_u`` is ``None`` for unpaired batches.
        teacher: the teacher's, same shapes, no gradient.
    """
    (pc, pu), (tc, tu) = pruned, teacher
    terms: dict[str, Tensor] = {}
    if objective.output_weight:
        out = _mse(pc, tc) if pu is None or tu is None else 0.5 * (_mse(pc, tc) + _mse(pu, tu))
        terms["output"] = objective.output_weight * out
    if pu is None or tu is None or objective.guidance is None:
        return terms
    g = objective.guidance
    if objective.guided_weight:
        terms["guided"] = objective.guided_weight * _mse(pu + g * (pc - pu), tu + g * (tc - tu))
    if objective.direction_weight:
        terms["direction"] = objective.direction_weight * _mse(pc - pu, tc - tu)
    return terms


def euler_to(predict: Any, x1: Tensor, t: Tensor, steps: int, guidance: float) -> Tensor:
    """Guided Euler flow from pure noise ``x1`` ``(B, N, C)`` at time 1 down to per-sample times ``t`` ``(B,)``.

    ``predict(x, t) -> (v_c, v_u)``; each sample takes ``steps`` equal steps from 1 to its own ``t``
    (``x ← x − Δ·v_g``, the toy sampler's rule).
    """
    x = x1
    dt = (1.0 - t) / steps
    for k in range(steps):
        now = 1.0 - k * dt
        vc, vu = predict(x, now)
        x = x - dt[:, None, None] * (vu + guidance * (vc - vu))
    return x


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.detach().float()).pow(2).mean()
