"""What a resumed run may change: settings applied from the new config, settings that only change the layout, and
settings that would make the resumed run a different run (refused).

A resumed run used to keep the checkpoint's learning rate whatever ``--lr`` said (the scheduler's saved base rates
win), so the NaN message's own fix, "lower the learning rate, then resume", did nothing. Now a changed optimiser or
schedule setting is applied from the step the run resumes at and recorded in the add-on's provenance; a changed data,
objective or precision setting is refused, because the resumed run would silently train something else.
"""

from __future__ import annotations

from typing import Any

import torch

from ppcl.distill.config import DistillConfig
from ppcl.errors import ConfigError

# Read afresh every step (grad_clip, the schedule through the lambda) or set below (lr, weight_decay).
APPLIED = ("lr", "weight_decay", "grad_clip", "steps", "warmup", "schedule", "min_lr_ratio")
# The run resumes exactly under another checkpoint/log cadence, with(out) sharding or gradient checkpointing.
LAYOUT = ("checkpoint_every", "log_every", "shard", "gradient_checkpointing")


def resume_changes(state: dict[str, Any], config: DistillConfig, trains: str) -> dict[str, list[Any]]:
    """The applied settings that differ from the checkpoint ``state``'s, as ``{name: [old, new]}``; ``trains`` says
    what the resumed stage trains (spans, levels, objective), to compare with what the checkpoint trained.

    Raises:
        ConfigError: a setting outside :data:`APPLIED` and :data:`LAYOUT` differs (named with both values), or the
            stage trains something else (another ``--level``).
    """
    saved, now = state.get("config", {}), config.to_json()
    changed = {k: [v, now.get(k)] for k, v in saved.items() if k in now and now[k] != v}
    refused = {k: v for k, v in changed.items() if k not in APPLIED + LAYOUT}
    if refused:
        raise ConfigError(
            "the resumed run would train something else than the checkpoint's run",
            expected=f"the checkpoint's values of {sorted(refused)} (a resume may change only "
            f"{', '.join(APPLIED)} and the checkpoint/log cadence)",
            found=", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(refused.items())),
            fix="resume with the run's settings, or start again with --overwrite",
        )
    if state.get("trains", trains) != trains:
        raise ConfigError(
            "the resumed run trains something else than the checkpoint's run",
            expected=f"what the checkpoint trained: {state['trains']}",
            found=trains,
            fix="resume with the --level (and objective) the run started with, or start again with --overwrite",
        )
    return {k: v for k, v in changed.items() if k in APPLIED}


def apply_changes(
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, config: DistillConfig, step: int
) -> None:
    """Put ``config``'s lr and weight decay into a just-loaded optimiser and scheduler, resuming at ``step``.

    ``LambdaLR.load_state_dict`` restores the saved base rates; the lambda is the new config's, so the schedule's
    shape follows the new steps/warm-up already and only the base rate needs replacing.
    """
    sched.base_lrs = [config.lr for _ in sched.base_lrs]
    for group in opt.param_groups:
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * config.lr_factor(step)
        group["weight_decay"] = config.weight_decay
    sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reports for the next row
