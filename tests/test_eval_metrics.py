"""Guided (CFG) agreement, x0-prediction NMSE per time bucket, paired toy batches and their wiring in
evaluate_levels."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ppcl.addon import PruningAddon
from ppcl.errors import ConfigError
from ppcl.eval.guided import image_psnr, paired_toy_batches, uncond_twin
from ppcl.eval.levels import evaluate_levels, format_table, level_columns, strict_overall
from ppcl.eval.metrics import (
    T_BUCKETS,
    bucket_index,
    check_buckets,
    guided_agreement,
    guided_velocity,
    mean_cosine,
    nmse,
    stratified_timesteps,
    x0_nmse_by_bucket,
    x0_prediction,
)
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, remove_addon, set_level
from ppcl.toy.benchmark import sample_benchmark

TINY_TOY = {
    "patch_size": 4,
    "in_channels": 48,
    "out_channels": 3,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": (4, 6, 6),
}
GUIDED_KEYS = ("guided_nmse", "guided_cosine", "direction_nmse", "direction_cosine", "cond_nmse", "uncond_nmse")


def _v(*values: float) -> torch.Tensor:
    """One sample of one token: ``(1, 1, C)``."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, -1)


# ------------------------------------------------------------------------------------------------ pure metrics


def test_nmse_and_cosine_by_hand() -> None:
    t = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # (2, 1, 2); Σ‖t‖² = 26
    assert nmse(t, t) == 0.0 and mean_cosine(t, t) == pytest.approx(1.0)
    assert nmse(1.1 * t, t) == pytest.approx(0.01)  # a 10% scale error: NMSE 0.01, cosine still 1
    assert mean_cosine(1.1 * t, t) == pytest.approx(1.0)
    assert nmse(torch.zeros_like(t), t) == pytest.approx(1.0)
    s = torch.tensor([[[4.0, -3.0]], [[0.0, 1.0]]])  # first sample orthogonal: cosines 0 and 1
    assert mean_cosine(s, t) == pytest.approx(0.5)
    assert nmse(s, t) == pytest.approx(((1 + 49) + 0) / 26)


def test_guided_velocity_interpolates_and_extrapolates() -> None:
    c, u = _v(2.0, 1.0), _v(1.0, 1.0)
    assert torch.equal(guided_velocity(c, u, 1.0), c) and torch.equal(guided_velocity(c, u, 0.0), u)
    assert torch.equal(guided_velocity(c, u, 4.0), _v(5.0, 1.0))


def test_guided_agreement_by_hand() -> None:
    # Teacher: v_c = (2, 1), v_u = (1, 1) → d = (1, 0), v_g = (5, 1) at g = 4.
    tc, tu = _v(2.0, 1.0), _v(1.0, 1.0)
    # Student off by (0, 1) in both halves: the direction is exact, each raw output is wrong.
    m = guided_agreement(_v(2.0, 2.0), _v(1.0, 2.0), tc, tu, 4.0)
    assert set(m) == set(GUIDED_KEYS)
    assert m["direction_nmse"] == 0.0 and m["direction_cosine"] == pytest.approx(1.0)
    assert m["guided_nmse"] == pytest.approx(1 / 26)  # ‖(5,2) − (5,1)‖² / ‖(5,1)‖²
    assert m["cond_nmse"] == pytest.approx(1 / 5) and m["uncond_nmse"] == pytest.approx(1 / 2)
    # Student ignores the prompt (v_c = v_u = the teacher's v_u): direction NMSE 1, guided NMSE g²‖d‖² / ‖v_g‖².
    m = guided_agreement(tu, tu, tc, tu, 4.0)
    assert m["direction_nmse"] == pytest.approx(1.0) and m["direction_cosine"] == 0.0
    assert m["guided_nmse"] == pytest.approx(16 / 26) and m["uncond_nmse"] == 0.0
    # Identical predictions: every NMSE 0, every cosine 1.
    m = guided_agreement(tc, tu, tc, tu, 4.0)
    assert all(m[k] == 0.0 for k in GUIDED_KEYS if k.endswith("nmse"))
    assert m["guided_cosine"] == pytest.approx(1.0) and m["direction_cosine"] == pytest.approx(1.0)


def test_x0_prediction_inverts_the_forward_process() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 2, generator=g), torch.randn(5, 3, 2, generator=g)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    tt = t[:, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    assert torch.allclose(x0_prediction(x_t, t, eps - x0), x0, atol=1e-6)


def test_x0_nmse_by_bucket_by_hand() -> None:
    # One sample per bucket; x_t = 1 everywhere, teacher v = 0 → x̂0^t = 1; the student's velocity is off by δ = 1
    # only in the sample at t = 0.6, so its bucket reads Σ(t·δ)² / Σ1² = 0.36 and the others 0.
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    x_t, v_t = torch.ones(4, 2, 3), torch.zeros(4, 2, 3)
    v_s = v_t.clone()
    v_s[2] = 1.0
    out = x0_nmse_by_bucket(x_t, t, v_s, v_t)
    assert list(out) == ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"]
    assert out["0.50-0.75"] == pytest.approx(0.36)
    assert out["0.00-0.25"] == out["0.25-0.50"] == out["0.75-1.00"] == 0.0
    # A bucket without samples is NaN; times outside [0, 1] (e.g. SD3's t x 1000) are refused.
    assert math.isnan(x0_nmse_by_bucket(x_t[:2], t[:2], v_s[:2], v_t[:2])["0.75-1.00"])
    with pytest.raises(ConfigError, match="times in"):
        x0_nmse_by_bucket(x_t, t * 1000, v_s, v_t)


def test_bucket_edges_and_stratification() -> None:
    edges = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.75, 1.0])
    assert bucket_index(edges, T_BUCKETS).tolist() == [0, 0, 1, 2, 3, 3]
    t = stratified_timesteps(10, T_BUCKETS, torch.Generator().manual_seed(0))
    assert t.shape == (10,)
    assert torch.bincount(bucket_index(t, T_BUCKETS), minlength=4).tolist() == [3, 3, 2, 2]
    with pytest.raises(ConfigError, match="every time bucket"):
        stratified_timesteps(3, T_BUCKETS, torch.Generator())
    for bad in ((), ((0.0, 0.5), (0.6, 1.0)), ((0.5, 0.2),), ((0.0, 1.5),)):
        with pytest.raises(ConfigError):
            check_buckets(bad)


def test_image_psnr() -> None:
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).numpy()
    b = a.copy()
    b[..., 0] = 3  # MSE 3 everywhere: 10 log10(255² / 3)
    assert image_psnr(b, a) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-3)
    with pytest.raises(ConfigError):
        image_psnr(b[:1], a)


# ------------------------------------------------------------------------------------------------ paired batches


@pytest.fixture(scope="module")
def toy_teacher() -> Any:
    from ppcl.toy.teacher import ToyTeacher

    return ToyTeacher.build(seed=0, config=TINY_TOY)


def test_paired_toy_batches_share_x_t_and_t_with_an_empty_prompt_twin(toy_teacher: Any) -> None:
    pairs = paired_toy_batches(toy_teacher, n_batches=2, batch_size=8, seed=3)
    empty_emb, empty_mask = toy_teacher.encode_prompts([""])
    assert len(pairs) == 2
    for cond, uncond in pairs:
        assert cond["hidden_states"].shape == (8, 64, 48)
        assert torch.equal(cond["hidden_states"], uncond["hidden_states"])
        assert torch.equal(cond["timestep"], uncond["timestep"]) and cond["img_shapes"] == uncond["img_shapes"]
        assert torch.equal(uncond["encoder_hidden_states"], empty_emb.expand(8, -1, -1))
        assert torch.equal(uncond["encoder_hidden_states_mask"], empty_mask.expand(8, -1))
        # Captioned (no dropout): every conditional prompt has words beyond the empty prompt's BOS.
        assert bool((cond["encoder_hidden_states_mask"].sum(1) > empty_mask.sum()).all())
        # Each batch covers every time bucket (8 samples, 4 buckets: 2 each).
        assert torch.bincount(bucket_index(cond["timestep"], T_BUCKETS), minlength=4).tolist() == [2, 2, 2, 2]
    again = paired_toy_batches(toy_teacher, n_batches=2, batch_size=8, seed=3)
    assert torch.equal(again[1][0]["hidden_states"], pairs[1][0]["hidden_states"])  # a pure function of the seed
    assert not torch.equal(pairs[0][0]["hidden_states"], pairs[1][0]["hidden_states"])
    with pytest.raises(ConfigError):
        paired_toy_batches(toy_teacher, n_batches=1, batch_size=3)
    with pytest.raises(ConfigError, match="shape"):
        uncond_twin(pairs[0][0], empty_emb[0], empty_mask[0])


# ------------------------------------------------------------------------------------------------ wiring


@pytest.fixture(scope="module")
def toy_addon(toy_teacher: Any) -> PruningAddon:
    model = toy_teacher.transformer
    plan = PruningPlan(
        "qwenimage",
        type(model).__name__,
        (4,),
        [DepthReplacement(Span(1, 3))],
        [Level("all", ("depth:1-3",))],
        protect_first=1,
        protect_last=1,
    ).validate()
    return PruningAddon.from_plan(model, plan)


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_evaluate_levels_reports_guided_metrics(toy_teacher: Any, toy_addon: PruningAddon) -> None:
    model = toy_teacher.transformer
    pairs = paired_toy_batches(toy_teacher, n_batches=1, batch_size=8, seed=0)
    rows = evaluate_levels(model, toy_addon, [pairs[0][0]], repeats=1, paired=pairs)
    student, teacher = rows["all"], rows["teacher"]
    for key in GUIDED_KEYS:
        assert _finite(student[key]), key
    assert student["guided_nmse"] > 0 and student["direction_nmse"] > 0  # an untrained student differs
    assert teacher["guided_nmse"] == 0.0 and teacher["direction_cosine"] == 1.0
    assert list(student["x0_nmse"]) == ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"]
    assert all(_finite(v) and v > 0 for v in student["x0_nmse"].values())
    assert set(teacher["x0_nmse"].values()) == {0.0}
    assert "psnr_db" not in student and "shapes_eval" not in student  # no toy: nothing sampled
    # The guidance scale reaches the metrics: at g = 1 the guided velocity is the conditional one.
    plain = evaluate_levels(model, toy_addon, [pairs[0][0]], repeats=1, paired=pairs, guidance=1.0)["all"]
    assert plain["guided_nmse"] == pytest.approx(plain["cond_nmse"])
    assert plain["guided_nmse"] != pytest.approx(student["guided_nmse"])
    table = format_table(rows)
    assert "guided NMSE" in table and "direction NMSE" in table and "t in 0.75-1.00" in table


def test_evaluate_levels_with_the_toy_adds_psnr_and_categories(toy_teacher: Any, toy_addon: PruningAddon) -> None:
    model = toy_teacher.transformer
    pairs = paired_toy_batches(toy_teacher, n_batches=1, batch_size=4, seed=0)
    rows = evaluate_levels(
        model,
        toy_addon,
        [pairs[0][0]],
        repeats=1,
        toy=toy_teacher,
        shapes_eval={"n_per_category": 1},
        paired=pairs,
        psnr_per_category=1,
    )
    assert rows["teacher"]["psnr_db"] is None and _finite(rows["all"]["psnr_db"])
    assert 0 < rows["all"]["psnr_db"] < 100
    assert _finite(rows["all"]["guided_nmse"])
    header, cells = level_columns(rows)
    for name in ("PSNR (dB)", "strict overall", "single", "two objects", "position", "color", "R"):
        assert name in header, name
    assert cells[0][header.index("PSNR (dB)")] == "—"
    # The PSNR is taken on the ShapesEval images themselves (equal prompts and noise): recompute it from them.
    apply_addon(model, toy_addon)
    try:
        images = {}
        for level in (None, "all"):
            set_level(model, level)
            images[level] = sample_benchmark(toy_teacher, model, n_per_category=1)[1]
    finally:
        remove_addon(model)
    assert rows["all"]["psnr_db"] == image_psnr(images["all"], images[None])
    # Without the teacher's images (its scores given), the PSNR samples its own prompts instead.
    known = evaluate_levels(
        model,
        toy_addon,
        [pairs[0][0]],
        repeats=1,
        toy=toy_teacher,
        shapes_eval={"n_per_category": 1},
        teacher_scores=rows["teacher"]["shapes_eval"],
        paired=pairs,
        psnr_per_category=1,
    )
    assert _finite(known["all"]["psnr_db"])
    assert known["all"]["shapes_eval"]["overall"] == rows["all"]["shapes_eval"]["overall"]  # same images scored


def test_tables_read_old_rows_and_the_strict_score() -> None:
    base = {
        "blocks": 4,
        "params": 1e6,
        "block_params_removed": 0.0,
        "flops_ratio": 1.0,
        "latency_ratio": 1.0,
        "cosine": 1.0,
        "nmse": 0.0,
        "R": 0.0,
    }
    scores = {"overall": 0.5, "single": 0.4, "two_objects": 0.5, "position": 0.6, "color": 0.5}
    old = {"teacher": {**base, "shapes_eval": scores}}  # a results.json from before the guided metrics
    header, cells = level_columns(old)
    assert "guided NMSE" not in header and cells[0][header.index("strict overall")] == "—"
    new = {"teacher": {**base, "shapes_eval": {**scores, "strict": {**scores, "overall": 0.25}}}}
    assert strict_overall(new["teacher"]["shapes_eval"]) == 0.25 and strict_overall(scores) is None
    header, cells = level_columns(new)
    assert cells[0][header.index("strict overall")] == "0.250"
    assert cells[0][header.index("ShapesEval overall")] == "0.500"
