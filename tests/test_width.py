"""Width pruning: text runs and FFN-to-linear blocks on tiny Qwen-Image / FLUX.1 / SD3 / SD3.5, plans, counts, runtime.

Exactness tests *plant* linear behaviour in a tiny teacher: text gates and modulations made temb-independent so the
text stream of a run passes through and its modulated features are per-channel affine in the anchor's, and FFNs made
constant so a second half is ``g + const``. The exact projection maps are then known in closed form, and the
width-pruned model must reproduce the planted teacher.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.errors import ConfigError
from ppcl.plan import DepthReplacement, FFNLinear, Level, PruningPlan, Span, TextRun
from ppcl.runtime import (
    MERGED_FILE,
    apply_addon,
    disabled,
    load_merged,
    merge,
    remove_addon,
    save_merged,
    set_level,
)
from ppcl.runtime.width import width_key
from tiny_models import build_tiny

ARCHS = ("qwenimage", "qwenimage_edit", "flux", "sd3", "sd35")


def _mod_linear(block: nn.Module, stream: str) -> nn.Linear:
    name = {"QwenImageTransformerBlock": {"image": "img_mod.1", "text": "txt_mod.1"}}.get(
        type(block).__name__, {"image": "norm1.linear", "text": "norm1_context.linear"}
    )[stream]
    return block.get_submodule(name)


def _ffn(block: nn.Module, stream: str) -> nn.Module:
    qwen = type(block).__name__ == "QwenImageTransformerBlock"
    return block.get_submodule(
        {"image": "img_mlp" if qwen else "ff", "text": "txt_mlp" if qwen else "ff_context"}[stream]
    )


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def _chunk(linear: nn.Linear, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight[k * d : (k + 1) * d], linear.bias[k * d : (k + 1) * d]


@torch.no_grad()
def _plant_constant_ffn(block: nn.Module, stream: str, g: torch.Generator) -> torch.Tensor:
    """Make ``stream``'s second half ``x + c·β`` (constant gate c, constant FFN output β); returns ``c·β`` ``(D,)``."""
    lin = _mod_linear(block, stream)
    d = lin.in_features
    w, b = _chunk(lin, 5, d)  # chunk 5 = gate of the second half (all three layouts)
    w.zero_()
    b.copy_(torch.rand(d, generator=g) + 0.5)
    last = _last_linear(_ffn(block, stream))
    last.weight.zero_()
    last.bias.copy_(torch.randn(d, generator=g))
    return b * last.bias


@torch.no_grad()
def _plant_text_run(
    blocks: list[nn.Module], g: torch.Generator
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Plant an exactly linear text stream on ``blocks`` (anchor first); returns the exact ``L_j`` maps ``(W, b)``
    of the later blocks and the exact ``L_h`` bias (its ``W`` is 0)."""
    consts = []
    for block in blocks:
        lin = _mod_linear(block, "text")
        d = lin.in_features
        lin.weight.zero_()  # every text shift/scale/gate is a constant: no temb dependence
        lin.bias.zero_()
        _chunk(lin, 0, d)[1].copy_(0.3 * torch.randn(d, generator=g))  # shift of the attention half
        _chunk(lin, 1, d)[1].copy_(0.3 * torch.randn(d, generator=g))  # scale of the attention half
        consts.append((_chunk(lin, 0, d)[1].clone(), _chunk(lin, 1, d)[1].clone()))
        # Gates stay 0 (text passes through) except the last block's FFN gate: h_b = h + c·β.
    h_bias = _plant_constant_ffn(blocks[-1], "text", g)
    t_a, s_a = consts[0]
    maps = []
    for t_j, s_j in consts[1:]:
        ratio = (1 + s_j) / (1 + s_a)  # z_j = (z_a - t_a)·ratio + t_j, per channel
        maps.append((torch.diag(ratio) - torch.eye(len(ratio)), t_j - t_a * ratio))
    return maps, h_bias


def _case(name: str) -> tuple[Any, PruningPlan, dict[str, Any]]:
    """Tiny model, width plan and planted exact maps: run [a, b] (inclusive), an FFN block outside, one inside."""
    case = build_tiny(name)
    model = case.model
    spec = get_spec(model)
    if name == "flux":
        run, ffn_out, ffn_in = Span(0, 3), None, 1  # the three double blocks; single blocks have no width variants
    else:
        run, ffn_out, ffn_in = Span(1, 4), 4, 2
    g = torch.Generator().manual_seed(1)
    blocks = [spec.block(model, i) for i in run.blocks]
    maps, h_bias = _plant_text_run(blocks, g)
    reps: list[Any] = [TextRun(run), FFNLinear(ffn_in, ("image",))]
    exact: dict[str, Any] = {width_key(reps[0], "out"): (None, h_bias)}
    exact.update({width_key(reps[0], f"in_{j}"): m for j, m in zip(run.blocks[1:], maps, strict=True)})
    exact[width_key(reps[1], "image")] = (None, _plant_constant_ffn(spec.block(model, ffn_in), "image", g))
    if ffn_out is not None:
        rep = FFNLinear(ffn_out)
        reps.append(rep)
        for stream in ("image", "text"):
            exact[width_key(rep, stream)] = (None, _plant_constant_ffn(spec.block(model, ffn_out), stream, g))
    levels = [Level("text", (reps[0].id,)), Level("all", tuple(r.id for r in reps))]
    plan = PruningPlan(
        spec.name, type(model).__name__, tuple(spec.stack_sizes(model)), reps, levels, protect_first=1, protect_last=1
    ).validate()
    return case, plan, exact


def _set_exact(addon: Any, exact: dict[str, Any]) -> None:
    for key, (W, b) in exact.items():
        proj = addon.students[key]
        proj.set_map(torch.zeros_like(proj.W) if W is None else W, b)


@pytest.mark.parametrize("name", ARCHS)
def test_planted_linear_behaviour_reproduces_teacher(name: str) -> None:
    case, plan, exact = _case(name)
    inputs = case.make_inputs(0)
    with torch.no_grad():
        teacher = case.forward(inputs)
    addon = PruningAddon.from_plan(case.model, plan)
    apply_addon(case.model, addon, level="all")
    with torch.no_grad():
        identity_out = case.forward(inputs)  # fresh projections are identities: not the teacher
    _set_exact(addon, exact)
    with torch.no_grad():
        pruned = case.forward(inputs)
        set_level(case.model, "text")
        text_only = case.forward(inputs)
        with disabled(case.model):
            original = case.forward(inputs)
    assert (identity_out - teacher).abs().max() > 1e-3
    torch.testing.assert_close(pruned, teacher, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(text_only, teacher, atol=2e-5, rtol=1e-4)
    assert torch.equal(original, teacher)
    remove_addon(case.model)
    with torch.no_grad():
        assert torch.equal(case.forward(inputs), teacher)


def test_unplanted_full_mode_is_bit_exact_and_level_none_restores() -> None:
    case = build_tiny("qwenimage")
    spec = get_spec(case.model)
    plan = PruningPlan(
        spec.name,
        type(case.model).__name__,
        (6,),
        [FFNLinear(3, ("image",))],
        [Level("f", ("ffn:3",))],
        protect_first=1,
        protect_last=1,
    ).validate()
    inputs = case.make_inputs(0)
    with torch.no_grad():
        teacher = case.forward(inputs)
    addon = PruningAddon.from_plan(case.model, plan)
    apply_addon(case.model, addon, level="f")
    with torch.no_grad():
        changed = case.forward(inputs)
        set_level(case.model, None)
        assert torch.equal(case.forward(inputs), teacher)
    assert not torch.equal(changed, teacher)


def test_width_with_depth_inside_a_run() -> None:
    """A depth span inside a text run: its removed blocks are skipped, its student is text-pruned."""
    case = build_tiny("qwenimage")
    spec = get_spec(case.model)
    depth = DepthReplacement(Span(2, 4))
    good, bad = TextRun(Span(1, 5), skip=(3,)), TextRun(Span(1, 5), id="text:nosk")
    plan = PruningPlan(
        spec.name,
        type(case.model).__name__,
        (6,),
        [depth, good, bad],
        [Level("d+w", (depth.id, good.id))],
        protect_first=1,
        protect_last=1,
    ).validate()
    assert good.pruned_blocks() == (2, 4)
    addon = PruningAddon.from_plan(case.model, plan)
    apply_addon(case.model, addon, level="d+w")
    with torch.no_grad():
        out = case.forward(case.make_inputs(0))
    assert torch.isfinite(out).all()
    remove_addon(case.model)
    with pytest.raises(ConfigError, match="overlap"):
        PruningPlan(
            spec.name,
            type(case.model).__name__,
            (6,),
            [depth, bad],
            [Level("x", (depth.id, bad.id))],
            protect_first=1,
            protect_last=1,
        ).validate()


def test_validation_rules() -> None:
    flux = build_tiny("flux").model
    spec = get_spec(flux)

    def plan(*reps: Any) -> PruningPlan:
        return PruningPlan(
            spec.name,
            type(flux).__name__,
            tuple(spec.stack_sizes(flux)),
            list(reps),
            [Level("l", tuple(r.id for r in reps))],
            protect_first=0,
            protect_last=0,
        )

    with pytest.raises(ConfigError, match="single-stream"):
        plan(TextRun(Span(3, 5))).validate()
    with pytest.raises(ConfigError, match="crosses"):
        plan(TextRun(Span(2, 4))).validate()
    with pytest.raises(ConfigError, match="without a separate FFN"):
        plan(FFNLinear(4)).validate()
    with pytest.raises(ConfigError, match="overlap"):
        plan(TextRun(Span(0, 3)), FFNLinear(1)).validate()  # the text FFN of a text-pruned block is already gone
    plan(TextRun(Span(0, 3)), FFNLinear(1, ("image",))).validate()
    with pytest.raises(ConfigError, match="strictly inside"):
        plan(TextRun(Span(0, 3), skip=(2,))).validate()


def test_plan_json_round_trip() -> None:
    qwen = build_tiny("qwenimage").model
    reps = [TextRun.from_inclusive(1, 4, skip=(3,)), FFNLinear(2, ("image",)), DepthReplacement(Span(2, 4))]
    plan = PruningPlan(
        "qwenimage",
        type(qwen).__name__,
        (6,),
        reps,
        [Level("l", tuple(r.id for r in reps))],
        protect_first=1,
        protect_last=1,
    ).validate()
    again = PruningPlan.from_json(copy.deepcopy(plan.to_json()))
    assert again.replacements == plan.replacements
    assert plan.to_json()["replacements"][0]["inclusive"] == [1, 4]


@pytest.mark.parametrize("name", ARCHS)
def test_param_count_equals_counted_modules(name: str) -> None:
    """removed_params = dropped submodules − added projections, cross-checked against the modules themselves."""
    case, plan, _ = _case(name)
    model, spec = case.model, get_spec(case.model)
    addon = PruningAddon.from_plan(model, plan)
    count = plan.param_count(dict(model.config), "all")
    run = plan.replacements[0]
    dropped = 0
    for j in run.pruned_blocks():
        block, targets = spec.block(model, j), spec.width_targets(model, j)
        dropped += sum(
            p.numel() for n in targets.text if n not in targets.text_kv for p in block.get_submodule(n).parameters()
        )
    for rep in plan.replacements[1:]:
        block = spec.block(model, rep.block)
        for stream in rep.streams:
            lin = _mod_linear(block, stream)
            dropped += sum(p.numel() for p in _ffn(block, stream).parameters()) + 3 * lin.in_features * (
                lin.in_features + 1
            )
    added = sum(p.numel() for p in addon.students.parameters())
    assert count.removed == dropped - added, (count.removed, dropped, added)


def test_real_qwen_image_public_depth_and_width_count() -> None:
    """The authors' public width choices on top of the public depth plan, counted on the real config (meta device)."""
    config = {
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "in_channels": 64,
        "out_channels": 16,
        "patch_size": 2,
        "axes_dims_rope": (16, 56, 56),
    }
    public = [
        (3, 4),
        (5, 7),
        (8, 10),
        (11, 12),
        (15, 24),
        (25, 27),
        (29, 30),
        (42, 43),
        (45, 47),
        (48, 49),
        (52, 53),
        (54, 55),
        (56, 57),
    ]
    depth = [DepthReplacement(Span.from_inclusive(u, v)) for u, v in public]
    gone = {i for r in depth for i in r.removed_blocks()}
    runs = [
        TextRun.from_inclusive(a, b, skip=sorted(gone & set(range(a + 1, b))))
        for a, b in [(36, 37), (40, 41), (50, 59)]
    ]
    pruned = {j for r in runs for j in r.pruned_blocks()}
    ffns = [FFNLinear(i, ("image",) if i in pruned else ("image", "text")) for i in (2, 58, 59)]
    reps = [*depth, *runs, *ffns]
    plan = PruningPlan(
        "qwenimage", "QwenImageTransformer2DModel", (60,), reps, [Level("public", tuple(r.id for r in reps))]
    ).validate()
    count = plan.param_count(config, "public")
    msg = (
        f"public depth + width: {count.after:,} parameters ({count.after / 1e9:.3f}B), removed {count.removed:,}, "
        f"text-pruned blocks {sorted(pruned)}"
    )
    assert abs(count.after - 10.5e9) / 10.5e9 < 0.01, msg
    assert count.after == 10_452_608_064, msg
    # The release keeps text q / text out projections (2 x (D^2 + D)) in its 8 text-pruned blocks: 10.604B.
    assert round((count.after + 8 * 2 * (3072**2 + 3072)) / 1e9, 3) == 10.604, msg


def _perturb(addon: Any, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("name", ARCHS)
def test_merge_equals_apply_and_load_merged_round_trip(name: str, tmp_path: Any) -> None:
    case, plan, _ = _case(name)
    model, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(model, plan)
    _perturb(addon)
    apply_addon(model, addon, "all")
    with torch.no_grad():
        applied = case.forward(inputs)
    merged = merge(model, addon, "all")
    n_merged = sum(p.numel() for p in merged.parameters())
    assert n_merged == plan.param_count(dict(model.config), "all").after
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs, return_dict=False)[0], applied, rtol=0, atol=1e-5)
        save_merged(merged, tmp_path / "m")
        assert (tmp_path / "m" / MERGED_FILE).is_file()
        loaded = load_merged(tmp_path / "m")
        assert torch.equal(loaded(**inputs, return_dict=False)[0], merged(**inputs, return_dict=False)[0])
    assert sum(p.numel() for p in loaded.parameters()) == n_merged


def test_merge_depth_and_width_together(tmp_path: Any) -> None:
    case = build_tiny("qwenimage")
    spec = get_spec(case.model)
    depth, run = DepthReplacement(Span(2, 4)), TextRun(Span(1, 5), skip=(3,))
    ffn = FFNLinear(2, ("image",))  # on the depth student, which is also text-pruned
    plan = PruningPlan(
        spec.name,
        type(case.model).__name__,
        (6,),
        [depth, run, ffn],
        [Level("dw", (depth.id, run.id, ffn.id))],
        protect_first=1,
        protect_last=1,
    ).validate()
    addon = PruningAddon.from_plan(case.model, plan)
    _perturb(addon)
    inputs = case.make_inputs(0)
    apply_addon(case.model, addon, "dw")
    with torch.no_grad():
        applied = case.forward(inputs)
    merged = merge(case.model, addon, "dw")
    assert merged.config["num_layers"] == 5
    assert sum(p.numel() for p in merged.parameters()) == plan.param_count(dict(case.model.config), "dw").after
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs, return_dict=False)[0], applied, rtol=0, atol=1e-5)
        loaded = load_merged(save_merged(merged, tmp_path / "m"))
        assert torch.equal(loaded(**inputs, return_dict=False)[0], merged(**inputs, return_dict=False)[0])


def test_select_text_runs_and_ffn_blocks() -> None:
    import numpy as np

    from ppcl.plan import select_ffn_blocks, select_text_runs, with_width_level

    L = 8
    cka = np.full((L + 1, L + 1), 0.5)
    np.fill_diagonal(cka, 1.0)
    cka[2, 3:6] = [0.99, 0.97, 0.96]  # anchor block 1 (depth 2): text stays similar through block 4 (depth 5)
    cka[6, 7:9] = [0.98, 0.9]  # anchor block 5: only block 6 follows closely
    assert select_text_runs(cka) == [(1, 4), (5, 6)]
    assert select_text_runs(cka, 0.97) == [(1, 3), (5, 6)]
    assert select_text_runs(cka, max_blocks=2) == [(1, 2), (5, 6)]
    assert select_text_runs(cka, allowed=range(4)) == [(1, 3)]
    errors = {
        "image": np.array([0.5, 0.1, 0.3, 0.05, 0.2, 0.9, 0.4, 0.6]),
        "text": np.array([0.5, 0.8, 0.1, 0.9, 0.1, 0.1, 0.4, 0.6]),
    }
    chosen = select_ffn_blocks(errors, 2, text_pruned=[3])
    # scores = worst replaced stream: block 3 (image only) 0.05, block 4 max(0.2, 0.1), block 2 max(0.3, 0.1)
    assert [(f.block, f.streams) for f in chosen] == [(3, ("image",)), (4, ("image", "text"))]

    qwen = build_tiny("qwenimage").model
    depth = DepthReplacement(Span(2, 4))
    plan = PruningPlan(
        "qwenimage", type(qwen).__name__, (6,), [depth], [Level("d", (depth.id,))], protect_first=1, protect_last=1
    )
    plan = with_width_level(plan, "dw", [(1, 4)], [2, 5], base_level="d")
    reps = plan.replacements_of("dw")
    assert [r.id for r in reps] == ["depth:2-4", "text:1-5", "ffn:2", "ffn:5"]
    assert reps[1].skip == (3,) and reps[2].streams == ("image",) and reps[3].streams == ("image", "text")


def test_projection_fit_from_accumulator_recovers_map() -> None:
    from ppcl.analysis.probes import ProbeAccumulator
    from ppcl.modules.projection import ResidualLinear

    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(8, 8, generator=g) * 0.1, torch.randn(8, generator=g)
    x = torch.randn(2, 50, 8, generator=g)
    acc = ProbeAccumulator(8)
    acc.update(x, x + x @ W.T + b)
    proj = ResidualLinear(8)
    assert proj.fit_from(acc, ridge=0.0) < 1e-6
    torch.testing.assert_close(proj.W.data, W, atol=1e-4, rtol=0)
    torch.testing.assert_close(proj(x), x + x @ W.T + b, atol=1e-4, rtol=0)


def test_deepcopy_of_applied_model_keeps_run_context_shared() -> None:
    case, plan, exact = _case("qwenimage")
    inputs = case.make_inputs(0)
    with torch.no_grad():
        teacher = case.forward(inputs)
    addon = PruningAddon.from_plan(case.model, plan)
    _set_exact(addon, exact)
    apply_addon(case.model, addon, "all")
    clone = copy.deepcopy(case.model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs, return_dict=False)[0], teacher, atol=2e-5, rtol=1e-4)


def test_sd3_last_block_has_no_text_ffn_to_replace() -> None:
    case = build_tiny("sd3")
    spec = get_spec(case.model)
    rep = FFNLinear(5)
    plan = PruningPlan(
        spec.name, type(case.model).__name__, (6,), [rep], [Level("l", (rep.id,))], protect_first=1, protect_last=1
    ).validate()
    with pytest.raises(ConfigError, match="does not have"):
        apply_addon(case.model, PruningAddon.from_plan(case.model, plan), "l")


def test_dual_stream_blocks() -> None:
    from ppcl.plan import dual_stream_blocks

    assert dual_stream_blocks("flux", (19, 38)) == list(range(19))
    assert dual_stream_blocks("sd3", (24,)) == list(range(23))
    assert dual_stream_blocks("qwenimage", (60,)) == list(range(60))
