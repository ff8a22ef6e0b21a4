"""Data echoing (``DistillConfig.teacher_reuse``): one teacher pass serves several steps, exactly and resumably."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ppcl.addon import PruningAddon
from ppcl.distill import DistillConfig, distill_depth, distill_width, finetune
from ppcl.distill.depth import DepthStep, depth_replacements
from ppcl.distill.echo import TeacherEcho
from ppcl.distill.finetune import FinetuneStep
from ppcl.distill.width import TeacherCapture
from ppcl.errors import ConfigError
from ppcl.runtime import apply_addon, remove_addon
from test_distill import FixedData, _plan
from test_width_train import _depth_width_plan
from tiny_models import TinyCase, build_tiny


def test_echo_keeps_the_last_batches_up_to_its_capacity() -> None:
    calls: list[int] = []

    def compute(key: int) -> Any:
        return lambda: calls.append(key) or key * 10

    echo: TeacherEcho[int] = TeacherEcho(2)
    assert [echo.get(k, compute(k)) for k in (0, 1, 0, 1, 2, 0)] == [0, 10, 0, 10, 20, 0]
    assert calls == [0, 1, 2, 0] and echo.hits == 2  # 0 was evicted by 2 (capacity 2: keys 1, 2 kept)
    none: TeacherEcho[int] = TeacherEcho(0)
    assert [none.get(5, compute(5)) for _ in range(2)] == [50, 50] and none.hits == 0  # capacity 0 keeps nothing
    assert echo.get(None, compute(7)) == 70 and echo.get(None, compute(7)) == 70 and calls[-2:] == [7, 7]
    echo.clear()
    echo.get(1, compute(1))
    assert calls[-1] == 1


class Recording(FixedData):
    """FixedData that records the data index of every batch drawn."""

    def __init__(self, case: TinyCase, n: int = 3) -> None:
        super().__init__(case, n)
        self.drawn: list[int] = []

    def batch(self, step: int) -> dict[str, Any]:
        self.drawn.append(step)
        return super().batch(step)


def _count(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    """Count the calls of ``cls.name`` (the original still runs)."""
    original, calls = getattr(cls, name), []

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_echoed_depth_steps_draw_each_batch_k_times_and_run_one_teacher_pass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, _plan(case))
    passes = _count(monkeypatch, DepthStep, "teacher_pass")
    data = Recording(case)
    config = DistillConfig(
        steps=5, batch_size=2, gradient_accumulation=2, teacher_reuse=2, checkpoint_every=0, log_every=1
    )
    distill_depth(case.model, addon, data, config, tmp_path)
    # Steps 0-1 share micro-batches 0, 1; steps 2-3 share 2, 3; step 4 draws 4, 5.
    assert data.drawn == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5]
    assert len(passes) == 6  # one teacher pass per distinct micro-batch
    with pytest.raises(ConfigError, match="teacher_reuse"):
        DistillConfig(teacher_reuse=0).validate()


def test_an_echoed_pass_gives_the_losses_of_a_fresh_one() -> None:
    """The kept records are not changed by the step that used them (chain-aware inputs included)."""
    case = build_tiny("qwenimage")
    model, plan = case.model, _plan(case)
    addon = PruningAddon.from_plan(model, plan)
    apply_addon(model, addon)
    try:
        step = DepthStep(model, addon.students, depth_replacements(plan), chain_mix=0.5, plan=plan)
        fresh = {k: v.detach() for k, v in step(**case.make_inputs(0)).items()}
        step.echo, step.data_index = TeacherEcho(1), 0
        for _ in range(3):
            losses = step(**case.make_inputs(0))
            losses_sum = torch.stack(list(losses.values())).sum()
            losses_sum.backward()  # the echoed records must survive a backward through the students
            assert all(torch.equal(losses[k].detach(), fresh[k]) for k in fresh)
        assert step.echo.hits == 2
    finally:
        remove_addon(model)


def test_resume_inside_an_echo_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    config = DistillConfig(
        steps=5, lr=1e-3, warmup=1, batch_size=2, teacher_reuse=2, checkpoint_every=1, log_every=1, chain_mix=0.5
    )

    def run(out: Path, **kwargs: Any) -> PruningAddon:
        case = build_tiny("qwenimage")
        addon = PruningAddon.from_plan(case.model, _plan(case))
        return distill_depth(case.model, addon, FixedData(case, n=3), config, out, **kwargs)

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=3)  # step 3 is the echo of step 2: the resumed run recomputes its pass
    resumed = run(tmp_path / "cut", resume=True)
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_width_and_finetune_echo_their_teacher_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, _depth_width_plan(case))
    captures = _count(monkeypatch, TeacherCapture, "__call__")
    teacher = _count(monkeypatch, FinetuneStep, "_teacher")
    config = DistillConfig(steps=4, batch_size=2, teacher_reuse=2, checkpoint_every=0, log_every=1)
    distill_width(case.model, addon, FixedData(case, n=3), config, tmp_path / "width", "dw", init=False)
    assert len(captures) == 2
    finetune(case.model, addon, FixedData(case, n=3), config, tmp_path / "ft", level="dw")
    assert len(teacher) == 2
    # Training the depth students inside the width positions changes what the capture records: never echoed.
    captures.clear()
    distill_width(
        case.model, addon, FixedData(case, n=3), config, tmp_path / "width2", "dw", init=False, train_students=True
    )
    assert len(captures) == 4
