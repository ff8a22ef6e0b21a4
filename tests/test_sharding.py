"""FSDP2-sharded depth distillation (:mod:`ppcl.distill.sharding`) in one CPU process, on a one-rank gloo group the
session makes for itself: the same weights as an unsharded run, resume across layouts, the model handed back exactly
as it came, and the refusals. Two real sharded processes are in ``tests/test_multiprocess.py``.

Tolerance: with one rank FSDP2 runs the same kernels on the same (unpadded) tensors, so the sharded and unsharded
runs agree to the bit; ``atol=1e-6`` leaves room for a reduction order other builds may pick. Training moves the
weights by ~1e-2 over these steps, so a shard that missed its update or a wrong resume would show four orders above.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ppcl.addon import PruningAddon
from ppcl.distill import distill_width
from ppcl.distill.run_folder import read_trainer_state
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.errors import ConfigError, TrainingError
from ppcl.plan import PruningPlan
from ppcl.runtime import active_level, apply_addon, remove_addon
from test_width_train import (
    _depth_width_plan,  # a depth span inside a text run + FFN linears, level "dw"
)
from tiny_models import TinyCase, build_tiny, two_span_plan


class Inputs:
    """Micro-batch ``i`` is the tiny model's own seeded input ``i`` (NaN from ``nan_from`` on)."""

    def __init__(self, case: TinyCase, nan_from: int | None = None) -> None:
        self.case, self.batch_size, self.nan_from = case, 2, nan_from

    def batch(self, step: int) -> dict[str, Any]:
        batch = self.case.make_inputs(step)
        if self.nan_from is not None and step >= self.nan_from:
            batch["hidden_states"] = torch.full_like(batch["hidden_states"], math.nan)
        return batch


def _config(**changes: Any) -> DistillConfig:
    return DistillConfig(
        **{"steps": 4, "lr": 1e-3, "warmup": 1, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, **changes}
    )


def _train(name: str, out: Path, **changes: Any) -> tuple[TinyCase, dict[str, torch.Tensor]]:
    case = build_tiny(name)
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    distill_depth(case.model, addon, Inputs(case), _config(**changes), out)
    return case, {k: v.detach().clone() for k, v in addon.students.state_dict().items()}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["qwenimage", "flux", "sd3"])
def test_sharded_run_equals_unsharded_and_hands_the_model_back(name: str, tmp_path: Path) -> None:
    _, want = _train(name, tmp_path / "plain")
    case = build_tiny(name)
    blocks = [list(stack) for stack in _stacks(case)]
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    trained_before = {k: v.clone() for k, v in addon.students.state_dict().items()}
    distill_depth(case.model, addon, Inputs(case), _config(shard=True), tmp_path / "sharded")
    got = {k: v.detach() for k, v in addon.students.state_dict().items()}
    _assert_close(got, want)
    assert any(not torch.equal(got[k], trained_before[k]) for k in got)  # it trained
    # The very same block objects, unchanged, and no FSDP class or process group left behind.
    assert [list(stack) for stack in _stacks(case)] == blocks
    assert all(type(b).__name__.startswith("FSDP") is False for stack in blocks for b in stack)
    assert all(torch.equal(v, state[k]) for k, v in case.model.state_dict().items())
    assert not dist.is_initialized()
    saved = PruningAddon.from_pretrained(tmp_path / "sharded" / "addon", case.model)
    assert saved.provenance["depth"]["config"]["shard"] is True
    _assert_close({k: v for k, v in saved.students.state_dict().items()}, want)


def test_sharded_run_with_checkpointing_and_accumulation_equals_unsharded(tmp_path: Path) -> None:
    """Recomputed students re-gather their shards in backward; gradients of two micro-batches accumulate sharded."""
    changes = {"gradient_checkpointing": True, "gradient_accumulation": 2}
    _, want = _train("flux", tmp_path / "plain", **changes)
    _, got = _train("flux", tmp_path / "sharded", shard=True, **changes)
    _assert_close(got, want)


def _stacks(case: TinyCase) -> list[torch.nn.ModuleList]:
    from ppcl.arch import get_spec

    return get_spec(case.model).stack_lists(case.model)


def _reversed_plan(model: torch.nn.Module) -> PruningPlan:
    """Two same-shaped students listed against their ids' sort order ([3:5] before [1:3]): the optimiser state is
    saved by parameter index, so a layout that reordered the parameters would swap their AdamW moments on resume."""
    from ppcl.arch import get_spec
    from ppcl.plan import DepthReplacement, Level, Span

    spec = get_spec(model)
    reps = [DepthReplacement(Span(3, 5), "middle"), DepthReplacement(Span(1, 3))]
    return PruningPlan(
        spec.name,
        type(model).__name__,
        tuple(spec.stack_sizes(model)),
        reps,
        [Level("b", (reps[0].id, reps[1].id))],
        protect_first=1,
        protect_last=1,
    ).validate()


@pytest.mark.parametrize(("first", "then"), [(False, True), (True, False)])
def test_resume_switches_sharding_and_matches_an_uninterrupted_run(first: bool, then: bool, tmp_path: Path) -> None:
    def run(out: Path, shard: bool, **kwargs: Any) -> dict[str, torch.Tensor]:
        case = build_tiny("qwenimage")  # a new process starts from the base weights and a fresh add-on
        addon = PruningAddon.from_plan(case.model, _reversed_plan(case.model))
        distill_depth(case.model, addon, Inputs(case), _config(shard=shard), out, **kwargs)
        return {k: v.detach().clone() for k, v in addon.students.state_dict().items()}

    want = run(tmp_path / "full", False)
    run(tmp_path / "cut", first, stop_at=2)
    assert not (tmp_path / "cut" / "addon").exists()
    _assert_close(run(tmp_path / "cut", then, resume=True), want)


def test_an_applied_addon_comes_back_at_its_level(tmp_path: Path) -> None:
    case = build_tiny("flux")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    apply_addon(case.model, addon, level="a")
    distill_depth(case.model, addon, Inputs(case), _config(shard=True, steps=2), tmp_path)
    assert active_level(case.model) == "a" and case.model.ppcl is addon.students
    inputs = case.make_inputs(0)
    with torch.no_grad():
        pruned = case.model(**inputs, return_dict=False)[0]
    remove_addon(case.model)
    with torch.no_grad():
        full = case.model(**inputs, return_dict=False)[0]
    assert not torch.equal(pruned, full)  # the level really runs the (trained) student


def test_nan_stops_a_sharded_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    blocks = [list(stack) for stack in _stacks(case)]
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    with pytest.raises(TrainingError, match="step 3 of 4"):
        distill_depth(case.model, addon, Inputs(case, nan_from=2), _config(shard=True), tmp_path)
    assert read_trainer_state(tmp_path / "checkpoint")["step"] == 2
    assert [list(stack) for stack in _stacks(case)] == blocks and not dist.is_initialized()
    assert all(torch.isfinite(v).all() for v in addon.students.state_dict().values())


def test_bf16_sharded_run_tracks_the_unsharded_one(tmp_path: Path) -> None:
    _, want = _train("sd3", tmp_path / "plain", mixed_precision="bf16")
    _, got = _train("sd3", tmp_path / "sharded", mixed_precision="bf16", shard=True)
    # Both autocast the same ops to bf16; only where accelerate's and the session's autocast regions differ could
    # bf16 rounding (~4e-3 relative) enter, hence a bf16-sized tolerance rather than fp32's.
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-3, msg=key)


def test_sharding_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    with pytest.raises(ConfigError, match="non-sequential depth distillation only") as err:
        distill_depth(case.model, addon, Inputs(case), _config(shard=True, mode="sequential"), tmp_path / "seq")
    assert "Fix:" in str(err.value)
    width = PruningAddon.from_plan(case.model, _depth_width_plan(case))
    with pytest.raises(ConfigError, match="non-sequential depth distillation only"):
        distill_width(case.model, width, Inputs(case), _config(shard=True), tmp_path / "width", "dw")
    assert not (tmp_path / "seq").exists() and not (tmp_path / "width").exists()
    assert not hasattr(case.model, "ppcl") and not dist.is_initialized()


def test_an_accelerate_fsdp_config_switches_sharding_on(tmp_path: Path) -> None:
    """On GPUs ``accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml`` makes an Accelerator whose
    distributed_type is FSDP (on CPU accelerate falls back to MULTI_CPU, so this stands in for it): the session then
    shards without ``shard=True`` and refuses what sharding cannot run, naming the config as the reason."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ppcl.distill.trainer import TrainingSession

    fsdp = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        is_main_process=True,
        device=torch.device("cpu"),
        wait_for_everyone=lambda: None,
        num_processes=1,
        process_index=0,
    )
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    session = TrainingSession(
        case.model,
        addon,
        Inputs(case),
        _config(),
        tmp_path / "a",
        False,
        fsdp,  # type: ignore[arg-type]
        shardable=True,
    )
    assert session.shard
    with pytest.raises(ConfigError, match="accelerate distributed_type FSDP"):
        TrainingSession(case.model, addon, Inputs(case), _config(), tmp_path / "b", False, fsdp)  # type: ignore[arg-type]


def test_a_failure_while_sharding_the_teacher_puts_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ppcl.distill import sharding

    calls = {"n": 0}
    real = sharding.fully_shard

    def third_fails(module: torch.nn.Module, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure in fully_shard")
        return real(module, **kwargs)

    monkeypatch.setattr(sharding, "fully_shard", third_fails)
    case = build_tiny("sd3")
    blocks = [list(stack) for stack in _stacks(case)]
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    with pytest.raises(RuntimeError, match="simulated"):
        distill_depth(case.model, addon, Inputs(case), _config(shard=True), tmp_path)
    assert [list(stack) for stack in _stacks(case)] == blocks and not dist.is_initialized()
    assert all(type(b).__name__.startswith("FSDP") is False for stack in _stacks(case) for b in stack)
