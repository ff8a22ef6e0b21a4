"""Test-only entry point: a tiny-Qwen depth distillation run in its own process.

Used by ``tests/test_multiprocess.py`` (under ``accelerate launch --num_processes 2 --cpu``, and as the 1-process
reference) and ``tests/test_sigkill.py`` (killed with SIGKILL at the points named by ``PPCL_TEST_PAUSE``, see
:mod:`ppcl.faults`). The final add-on lands in ``OUT/addon``; the run's exit code is 0 on success.

With ``--shard`` the depth run is FSDP2-sharded (:mod:`ppcl.distill.sharding`). With ``--more-stages`` it then also
trains a width level (projections and the text-pruned student jointly) into
``OUT/width`` and fine-tunes that level into ``OUT/finetune``, on a fresh tiny model each.

Usage: ``python tests/mp_distill_worker.py OUT [--steps N] [--accumulation A] [--checkpoint-every K] [--resume]
[--more-stages] [--shard]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models, when launched by accelerate from elsewhere

from ppcl.addon import PruningAddon
from ppcl.distill import distill_width, finetune
from ppcl.distill.trainer import DistillConfig, distill_depth
from tiny_models import TinyCase, build_tiny, two_span_plan

BATCH_SIZE = 2


class IndexedData:
    """Micro-batch ``i`` is the tiny model's own seeded input batch ``i``: a pure function of the index, as the
    trainer requires (the trainer maps (step, micro, rank) to the index)."""

    def __init__(self, case: TinyCase) -> None:
        self.case, self.batch_size = case, BATCH_SIZE

    def batch(self, step: int) -> dict[str, Any]:
        """The inputs seeded by ``step``."""
        return self.case.make_inputs(step)

    def describe(self) -> dict[str, Any]:
        """Provenance entry."""
        return {"source": "tiny qwenimage inputs"}


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the distillation described by ``argv``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--more-stages", action="store_true")
    parser.add_argument("--shard", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # bit-exact comparisons between processes need the same reduction order
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    config = DistillConfig(
        steps=args.steps,
        lr=1e-3,
        warmup=1,
        batch_size=BATCH_SIZE,
        gradient_accumulation=args.accumulation,
        checkpoint_every=args.checkpoint_every,
        log_every=1,
        shard=args.shard,
    )
    distill_depth(case.model, addon, IndexedData(case), config, args.out, resume=args.resume)
    if args.more_stages:
        from test_width_train import _depth_width_plan  # a depth span inside a text run + FFN linears, level "dw"

        case = build_tiny("qwenimage")
        addon = PruningAddon.from_plan(case.model, _depth_width_plan(case))
        short = DistillConfig(**{**config.to_json(), "betas": config.betas, "steps": 3, "shard": False})
        distill_width(
            case.model, addon, IndexedData(case), short, args.out / "width", "dw", init_batches=2, train_students=True
        )
        finetune(case.model, addon, IndexedData(case), short, args.out / "finetune", "dw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
