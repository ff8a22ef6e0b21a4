"""Depth distillation: losses, data sources, the non-sequential / sequential step and the trainer (resume, NaN)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ppcl.addon import PruningAddon, student_key
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet
from ppcl.data.recorder import ActivationRecorder
from ppcl.distill.data import CalibrationData, DistillData
from ppcl.distill.depth import DepthStep, depth_replacements, sequential_level
from ppcl.distill.losses import depth_loss, normalized_mse
from ppcl.distill.run_folder import read_trainer_state
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.errors import ArtefactError, ConfigError, TrainingError
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import active_level, apply_addon, remove_addon
from ppcl.toy.distill_data import ToyDistillData
from tiny_models import TinyCase, build_tiny

# ------------------------------------------------------------------------------------------------------- losses


def test_normalized_mse_is_two_minus_two_cos() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g) * 7.0
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert torch.allclose(normalized_mse(a, b), (2 - 2 * cos).mean(), atol=1e-6)
    # Blind to per-token scale, zero when equal, 4 when opposite.
    assert torch.allclose(normalized_mse(a * 3.0, b), normalized_mse(a, b), atol=1e-6)
    assert normalized_mse(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_mse(a, -a).item() == pytest.approx(4.0, abs=1e-5)


def test_normalized_mse_mask_counts_valid_tokens_only() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    b_garbage = b.clone()
    b_garbage[~mask] = 1e6  # masked tokens may hold anything
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    expected = (2 - 2 * cos)[mask].mean()
    assert torch.allclose(normalized_mse(a, b_garbage, mask), expected, atol=1e-6)
    assert torch.allclose(normalized_mse(a, b, torch.ones(2, 4)), normalized_mse(a, b), atol=1e-6)
    assert normalized_mse(a, b, torch.zeros(2, 4)).item() == 0.0
    with pytest.raises(ConfigError):
        normalized_mse(a, b, torch.ones(2, 5))


def test_normalized_mse_gradient_only_to_pred() -> None:
    a = torch.randn(1, 3, 4, requires_grad=True)
    b = torch.randn(1, 3, 4, requires_grad=True)
    normalized_mse(a, b).backward()
    assert a.grad is not None and b.grad is None


def test_depth_loss_sums_present_streams() -> None:
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    img_t, txt_t = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    both = depth_loss({"image": img, "text": txt}, {"image": img_t, "text": txt_t})
    assert torch.allclose(both, normalized_mse(img, img_t) + normalized_mse(txt, txt_t))
    # SD3's last block has no text output: that stream is skipped.
    only = depth_loss({"image": img, "text": txt}, {"image": img_t, "text": None})
    assert torch.allclose(only, normalized_mse(img, img_t))
    assert depth_loss({"image": img, "text": txt}, {"image": img, "text": txt}).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ConfigError):
        depth_loss({"image": None}, {"image": img_t})


# --------------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def toy_teacher() -> Any:
    from ppcl.toy.teacher import ToyTeacher

    return ToyTeacher.build(
        seed=0,
        config={
            "patch_size": 4,
            "in_channels": 48,
            "out_channels": 3,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 64,
            "axes_dims_rope": (4, 6, 6),
        },
    )


def test_toy_data_is_deterministic_per_step(toy_teacher: Any) -> None:
    data = ToyDistillData(toy_teacher, batch_size=4, seed=3)
    assert isinstance(data, DistillData)
    a, b, c = data.batch(5), ToyDistillData(toy_teacher, batch_size=4, seed=3).batch(5), data.batch(6)
    assert a["hidden_states"].shape == (4, 64, 48)
    assert a["encoder_hidden_states"].shape[0] == 4 and a["encoder_hidden_states"].shape[2] == 64
    assert a["encoder_hidden_states_mask"].shape == a["encoder_hidden_states"].shape[:2]
    assert a["img_shapes"] == [[(1, 8, 8)]] * 4
    for key in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["hidden_states"], c["hidden_states"])
    assert ((a["timestep"] >= 0) & (a["timestep"] <= 1)).all()
    logit = ToyDistillData(toy_teacher, batch_size=64, seed=3, timestep_sampling="logit_normal").batch(0)["timestep"]
    assert 0.3 < float(logit.mean()) < 0.7 and float(logit.min()) > 0
    with pytest.raises(ConfigError):
        ToyDistillData(toy_teacher, batch_size=4, timestep_sampling="cosine")  # type: ignore[arg-type]
    # Full dropout: every caption empty, so every mask row is empty of words.
    empty = ToyDistillData(toy_teacher, batch_size=3, caption_dropout=1.0).batch(0)
    full = ToyDistillData(toy_teacher, batch_size=3, caption_dropout=0.0).batch(0)
    assert empty["encoder_hidden_states_mask"].sum() < full["encoder_hidden_states_mask"].sum()


def test_calibration_data_cycles_seeded_shuffles() -> None:
    n = 10
    cal = CalibrationSet(
        "qwenimage",
        "QwenImageTransformer2DModel",
        "x",
        batched={
            "hidden_states": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3),
            "timestep": torch.arange(n, dtype=torch.float32),
        },
        lists={"img_shapes": [[(1, i, 1)] for i in range(n)]},
    )
    data = CalibrationData(cal, batch_size=3, seed=1)
    assert data.batches_per_epoch == 3
    epoch0 = np.concatenate([data.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch
    assert not np.array_equal(data.indices(0), data.indices(3))  # a new shuffle each epoch
    batch = data.batch(4)
    idx = data.indices(4)
    assert torch.equal(batch["timestep"], torch.tensor(idx, dtype=torch.float32))
    assert batch["img_shapes"] == [[(1, int(i), 1)] for i in idx]
    assert torch.equal(CalibrationData(cal, 3, seed=1).batch(4)["hidden_states"], batch["hidden_states"])
    with pytest.raises(ConfigError):
        CalibrationData(cal, batch_size=11)


# ------------------------------------------------------------------------------------------ depth step + trainer
ARCHS = ("qwenimage", "flux", "sd3")
EARLY, LATE = "depth:1-3", "depth:3-5"


def _plan(case: TinyCase, levels: list[Level] | None = None) -> PruningPlan:
    """Two adjacent spans on the 6-block tiny models (flux: one per stack), levels "early" and "all"."""
    spec = get_spec(case.model)
    reps = [DepthReplacement(Span(1, 3)), DepthReplacement(Span(3, 5))]
    levels = levels or [Level("early", (EARLY,)), Level("all", (EARLY, LATE))]
    return PruningPlan(
        spec.name,
        type(case.model).__name__,
        tuple(spec.stack_sizes(case.model)),
        reps,
        levels,
        protect_first=1,
        protect_last=1,
    ).validate()


class FixedData:
    """``n`` fixed batches from the tiny model's own input maker, cycled by step."""

    def __init__(self, case: TinyCase, n: int = 1, nan_from: int | None = None) -> None:
        self.case, self.n, self.nan_from = case, n, nan_from

    def batch(self, step: int) -> dict[str, Any]:
        batch = self.case.make_inputs(step % self.n)
        if self.nan_from is not None and step >= self.nan_from:
            batch["hidden_states"] = torch.full_like(batch["hidden_states"], math.nan)
        return batch

    def describe(self) -> dict[str, Any]:
        return {"source": "tiny", "n": self.n}


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ARCHS)
def test_nonsequential_lowers_loss_and_changes_students_only(name: str, tmp_path: Path) -> None:
    case = build_tiny(name)
    model = case.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addon = PruningAddon.from_plan(model, _plan(case))
    before = {k: v.clone() for k, v in addon.state_dict().items()}
    config = DistillConfig(
        steps=6, lr=2e-3, warmup=0, schedule="constant", batch_size=2, log_every=1, checkpoint_every=0
    )
    out = distill_depth(model, addon, FixedData(case), config, tmp_path)
    assert out is addon
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in (EARLY, LATE):
        assert rows[-1]["spans"][key] < 0.8 * rows[0]["spans"][key]
    # The teacher is untouched and the add-on was taken off again; every student moved.
    after = model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert not hasattr(model, "ppcl")
    changed = {k.split(".")[0] for k, v in addon.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {student_key(EARLY), student_key(LATE)}
    # The final add-on folder loads and records how it was made.
    saved = PruningAddon.from_pretrained(tmp_path / "addon", model)
    assert saved.provenance["depth"]["steps"] == 6 and saved.provenance["depth"]["mode"] == "nonsequential"
    assert all(torch.equal(v, addon.state_dict()[k]) for k, v in saved.state_dict().items())


def student_inputs(
    step: DepthStep, addon: PruningAddon, inputs: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Run ``step`` on ``inputs``; the keyword arguments each student was first called with, and the losses."""
    seen: dict[str, dict[str, Any]] = {}

    def spy(key: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            seen.setdefault(key, dict(kwargs))

        return hook

    handles = [s.register_forward_pre_hook(spy(k), with_kwargs=True) for k, s in addon.students.items()]
    try:
        losses = step(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, losses


def test_student_input_is_the_teachers_even_behind_an_active_student() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(0)
    with torch.no_grad(), ActivationRecorder(model, [1, 3], clone=True) as teacher:
        case.forward(inputs)
    plan = _plan(case)
    addon = PruningAddon.from_plan(model, plan)
    with torch.no_grad():  # make the early student clearly different from the teacher block it copies
        for p in addon.students[student_key(EARLY)].parameters():
            p.mul_(1.5)
    apply_addon(model, addon, level="all")  # the pruned model is what runs outside the teacher pass
    step = DepthStep(model, addon.students, depth_replacements(plan))
    seen, losses = student_inputs(step, addon, inputs)
    assert set(losses) == {EARLY, LATE}
    for key, block in ((student_key(EARLY), 1), (student_key(LATE), 3)):
        recorded = teacher[block][0].kwargs
        for arg in ("hidden_states", "encoder_hidden_states", "temb"):
            assert torch.equal(seen[key][arg], recorded[arg]), (key, arg)
    # ... whereas the pruned model feeds the late span something else.
    with torch.no_grad(), ActivationRecorder(model, [3]) as pruned:
        case.forward(inputs)
    assert not torch.equal(pruned[3][0].kwargs["hidden_states"], teacher[3][0].kwargs["hidden_states"])
    assert active_level(model) == "all"
    remove_addon(model)


@pytest.mark.parametrize("name", ["qwenimage", "qwenimage_edit", "flux"])
def test_sequential_gradients_reach_earlier_students(name: str) -> None:
    case = build_tiny(name)
    model, inputs = case.model, case.make_inputs(0)
    plan = _plan(case)
    addon = PruningAddon.from_plan(model, plan)
    model.requires_grad_(False)
    apply_addon(model, addon)
    reps = depth_replacements(plan)
    early = addon.students[student_key(EARLY)]

    seq = DepthStep(model, addon.students, reps, mode="sequential", level=sequential_level(plan, reps, None))
    losses = seq(**inputs)
    assert active_level(model) == "all"  # kept for the backward's recomputation
    losses[LATE].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in early.parameters())

    addon.students.zero_grad(set_to_none=True)
    nonseq = DepthStep(model, addon.students, reps)
    ns_losses = nonseq(**inputs)
    ns_losses[LATE].backward()
    assert all(p.grad is None for p in early.parameters())  # non-sequential: spans are independent
    # The first span sees the teacher's input in both modes.
    assert torch.allclose(ns_losses[EARLY], losses[EARLY], atol=1e-6)
    remove_addon(model)


def test_sequential_level_needs_a_level_holding_every_span() -> None:
    case = build_tiny("qwenimage")
    plan = _plan(case, [Level("a", (EARLY,)), Level("b", (LATE,))])
    reps = depth_replacements(plan)
    with pytest.raises(ConfigError, match="one level holding every span"):
        sequential_level(plan, reps, None)
    assert sequential_level(plan, depth_replacements(plan, "b"), "b") == "b"
    assert sequential_level(_plan(case), depth_replacements(_plan(case)), None) == "all"
    assert [r.id for r in depth_replacements(plan, "a")] == [EARLY]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    case = build_tiny("qwenimage")
    model, inputs = case.model, case.make_inputs(1)
    plan = _plan(case)
    addon = PruningAddon.from_plan(model, plan)
    model.requires_grad_(False)
    apply_addon(model, addon)
    reps = depth_replacements(plan)

    def grads(step: DepthStep) -> list[torch.Tensor]:
        addon.students.zero_grad(set_to_none=True)
        torch.stack(list(step(**inputs).values())).sum().backward()
        return [p.grad.clone() for p in addon.students.parameters()]

    plain = grads(DepthStep(model, addon.students, reps))
    ckpt = grads(DepthStep(model, addon.students, reps, gradient_checkpointing=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt, strict=True))
    seq = grads(DepthStep(model, addon.students, reps, mode="sequential", level="all"))
    model.enable_gradient_checkpointing()
    seq_ckpt = grads(DepthStep(model, addon.students, reps, mode="sequential", level="all"))
    model.disable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seq, seq_ckpt, strict=True))
    remove_addon(model)


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    config = DistillConfig(
        steps=4, lr=1e-3, warmup=1, batch_size=2, gradient_accumulation=2, checkpoint_every=1, log_every=1
    )

    def run(out: Path, **kwargs: Any) -> PruningAddon:
        case = build_tiny("qwenimage")
        addon = PruningAddon.from_plan(case.model, _plan(case))
        return distill_depth(case.model, addon, FixedData(case, n=3), config, out, **kwargs)

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=2)
    assert not (tmp_path / "cut" / "addon").exists()
    state = read_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["step"] == 2
    with pytest.raises(ConfigError, match="already holds"):
        run(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=True)
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in _rows(tmp_path / "full")]


def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    case = build_tiny("flux")
    model = case.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addon = PruningAddon.from_plan(model, _plan(case))
    config = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1)
    with pytest.raises(TrainingError, match="step 3 of 4") as err:
        distill_depth(model, addon, FixedData(case, nan_from=2), config, tmp_path)
    assert EARLY in str(err.value) and LATE in str(err.value)
    state = read_trainer_state(tmp_path / "checkpoint")
    assert state["step"] == 2
    saved = PruningAddon.from_pretrained(tmp_path / "checkpoint", model)
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())
    # The model is handed back as it came.
    assert not hasattr(model, "ppcl") and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_lr_inf_stops_keeps_a_finite_checkpoint_and_a_resume_at_a_sane_lr_completes(tmp_path: Path) -> None:
    """Issue 14: the checkpoint of a diverged update is never written, and --lr on --resume is applied."""
    import dataclasses

    case = build_tiny("flux")
    model = case.model
    addon = PruningAddon.from_plan(model, _plan(case))
    sane = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1, lr=1e-3)
    distill_depth(model, addon, FixedData(case), sane, tmp_path, stop_at=2)
    with pytest.raises(TrainingError, match="not finite after step 3 of 4") as err:
        distill_depth(model, addon, FixedData(case), dataclasses.replace(sane, lr=float("inf")), tmp_path, resume=True)
    assert "checkpoint of this step was not written" in str(err.value) and "--resume --lr" in str(err.value)
    assert read_trainer_state(tmp_path / "checkpoint")["step"] == 2
    kept = PruningAddon.from_pretrained(tmp_path / "checkpoint", model)
    assert all(torch.isfinite(v).all() for v in kept.state_dict().values())
    lower = dataclasses.replace(sane, lr=5e-4)
    distill_depth(model, addon, FixedData(case), lower, tmp_path, resume=True)
    done = PruningAddon.from_pretrained(tmp_path / "addon", model)
    assert all(torch.isfinite(v).all() for v in done.state_dict().values())
    assert done.provenance["depth"]["resumed_with_changes"] == {"lr": [1e-3, 5e-4]}
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["lr"] == pytest.approx(1e-3 * sane.lr_factor(1))
    assert rows[2]["lr"] == pytest.approx(5e-4 * lower.lr_factor(2))  # the new lr from the resumed step on


def test_checkpoints_pickle_nothing_and_a_legacy_state_still_resumes_exactly(tmp_path: Path) -> None:
    """Issue 14: the trainer state is JSON + safetensors; an old torch.save state resumes to the same weights."""
    case = build_tiny("flux")
    config = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1, lr=1e-3)

    def run(out: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
        addon = PruningAddon.from_plan(case.model, _plan(case))
        distill_depth(case.model, addon, FixedData(case), config, out, **kwargs)
        return addon.state_dict()

    reference = run(tmp_path / "ref")
    run(tmp_path / "cut", stop_at=2)
    folder = tmp_path / "cut" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("trainer_state")) == [
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]
    state = read_trainer_state(folder)
    torch.save(state, folder / "trainer_state.pt")  # what a checkpoint of an earlier ppcl holds
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (folder / name).unlink()
    resumed = run(tmp_path / "cut", resume=True)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_drops_a_cut_short_metrics_line_and_refuses_a_damaged_log(tmp_path: Path) -> None:
    """What a SIGKILL during the metrics append leaves (a half line) is dropped; damage before the end is an error."""
    case = build_tiny("flux")
    config = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1)
    addon = PruningAddon.from_plan(case.model, _plan(case))
    distill_depth(case.model, addon, FixedData(case), config, tmp_path / "a", stop_at=2)
    with (tmp_path / "a" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.1')
    distill_depth(case.model, addon, FixedData(case), config, tmp_path / "a", resume=True)
    assert [r["step"] for r in _rows(tmp_path / "a")] == [1, 2, 3, 4]
    distill_depth(case.model, addon, FixedData(case), config, tmp_path / "b", stop_at=2)
    log = tmp_path / "b" / "metrics.jsonl"
    log.write_text("garbage\n" + log.read_text())
    with pytest.raises(ArtefactError, match="metrics log is damaged") as err:
        distill_depth(case.model, addon, FixedData(case), config, tmp_path / "b", resume=True)
    assert "line 1" in str(err.value)


def test_resume_refuses_a_change_of_run(tmp_path: Path) -> None:
    import dataclasses

    case = build_tiny("flux")
    addon = PruningAddon.from_plan(case.model, _plan(case))
    config = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1)
    distill_depth(case.model, addon, FixedData(case), config, tmp_path, stop_at=2)
    with pytest.raises(ConfigError, match="would train something else") as err:
        distill_depth(
            case.model,
            addon,
            FixedData(case),
            dataclasses.replace(config, seed=3, chain_mix=0.0),
            tmp_path,
            resume=True,
        )
    assert "seed 0 -> 3" in str(err.value) and "chain_mix 0.5 -> 0.0" in str(err.value)
    with pytest.raises(ConfigError, match="trains something else") as err:
        distill_depth(case.model, addon, FixedData(case), config, tmp_path, resume=True, level="early")
    assert "1 span(s)" in str(err.value) and "2 span(s)" in str(err.value)


def test_sequential_training_runs_with_checkpointing_and_bf16(tmp_path: Path) -> None:
    case = build_tiny("sd3")
    addon = PruningAddon.from_plan(case.model, _plan(case))
    config = DistillConfig(
        mode="sequential",
        steps=2,
        batch_size=2,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        checkpoint_every=0,
        log_every=1,
    )
    distill_depth(case.model, addon, FixedData(case), config, tmp_path)
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert not case.model.gradient_checkpointing
    prov = PruningAddon.from_pretrained(tmp_path / "addon", case.model).provenance["depth"]
    assert prov["sequential_level"] == "all" and prov["mixed_precision"] == "bf16"


def test_toy_data_drives_the_toy_teacher(tmp_path: Path) -> None:
    from ppcl.toy.teacher import ToyTeacher

    teacher = ToyTeacher.build(
        seed=0,
        config={
            "patch_size": 4,
            "in_channels": 48,
            "out_channels": 3,
            "num_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 64,
            "axes_dims_rope": (4, 6, 6),
        },
    )
    model = teacher.transformer
    plan = PruningPlan(
        "qwenimage",
        type(model).__name__,
        (4,),
        [DepthReplacement(Span(1, 3))],
        [Level("all", ("depth:1-3",))],
        protect_first=1,
        protect_last=1,
    ).validate()
    addon = PruningAddon.from_plan(model, plan)
    data = ToyDistillData(teacher, batch_size=2, seed=0, timestep_sampling="logit_normal")
    config = DistillConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=0)
    distill_depth(model, addon, data, config, tmp_path)
    assert addon.provenance["depth"]["data"]["source"] == "toy.ShapesWorld"
    assert len(_rows(tmp_path)) == 2
    with pytest.raises(ConfigError, match="batch size"):
        distill_depth(model, addon, data, DistillConfig(steps=2, batch_size=4), tmp_path / "x")


def test_config_validation_and_schedule() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        DistillConfig(steps=4, warmup=5).validate()
    with pytest.raises(ConfigError, match="mode"):
        DistillConfig(mode="chained").validate()  # type: ignore[arg-type]
    cfg = DistillConfig(steps=10, warmup=2, min_lr_ratio=0.1).validate()
    factors = [cfg.lr_factor(s) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False)) and factors[-1] >= 0.1


def test_step_modules_follow_the_declared_protocol() -> None:
    """Issue 15: the loop's contract with a step module is a declared Protocol (StepModule), not an implicit one."""
    from ppcl.distill.step_module import StepModule

    case = build_tiny("qwenimage")
    plan = _plan(case)
    addon = PruningAddon.from_plan(case.model, plan)
    step = DepthStep(case.model, addon.students, depth_replacements(plan))
    assert isinstance(step, StepModule)
    assert (step.measure, step.micro_index, step.data_index) == (False, 0, None)
    assert not isinstance(torch.nn.Linear(2, 2), StepModule)
