"""The add-on composes with diffusers' hook system (issue 16, item 1): caches, group offload and layerwise casting in
either order with ``apply_addon``, ``torch.compile(fullgraph=True)`` at every level, wrappers added after applying.

Each case compares against a reference computed without the hook (or without ppcl), so a hook that silently erases
the dispatch (the measured failure: ``enable_cache`` → ``apply_addon`` → ``disable_cache`` left ``p40`` active but ran
the base model) fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import ppcl
from ppcl.addon import PruningAddon
from ppcl.errors import ConfigError, PPCLError
from ppcl.modules.offload import execution_device
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import active_level, apply_addon, merge, remove_addon, set_level
from test_addon_width import _perturb, width_plan
from tiny_models import _qwen_inputs, build_tiny, two_span_plan
from tiny_pipelines import build_flux


def _case(name: str = "flux"):
    case = build_tiny(name)
    plain = copy.deepcopy(case.model)
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():  # trained students differ from the blocks they were copied from
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return case, plain, addon


@torch.no_grad()
def _levels(model, addon, inputs, levels: tuple[str | None, ...] = (None, "a", "b")) -> dict:
    """Outputs of ``levels`` of ``addon`` on a private copy of ``model`` (no hooks involved)."""
    model, addon = copy.deepcopy(model), copy.deepcopy(addon)
    apply_addon(model, addon)
    out = {}
    for level in levels:
        set_level(model, level)
        out[level] = model(**inputs, return_dict=False)[0]
    return out


def _run(model, inputs, context: str | None = None):
    with torch.no_grad():
        if context is None:
            return model(**inputs, return_dict=False)[0]
        with model.cache_context(context):
            return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("order", ["cache_first", "addon_first"])
def test_first_block_cache_in_either_order(order: str) -> None:
    """FirstBlockCache with threshold 0 on the tiny FLUX.1 (it computes whenever the first block's residual changes,
    and serves its cache on a repeated call): every level gives its own output while the cache is on, within one
    cache context (a level switch resets what the cache kept), and after ``disable_cache``, in both orders."""
    from diffusers import FirstBlockCacheConfig

    case, plain, addon = _case()
    inputs = case.make_inputs(0)
    expected = _levels(plain, addon, inputs)
    model = case.model
    if order == "cache_first":
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        apply_addon(model, addon, "b")
    else:
        apply_addon(model, addon, "b")
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    for level in ("b", "a", None, "b"):
        set_level(model, level)
        torch.testing.assert_close(_run(model, inputs, "cond"), expected[level], rtol=0, atol=1e-6)
        torch.testing.assert_close(_run(model, inputs, "cond"), expected[level], rtol=0, atol=1e-5)  # a cache hit
    set_level(model, "b")
    model.disable_cache()
    assert active_level(model) == "b"
    torch.testing.assert_close(_run(model, inputs), expected["b"], rtol=0, atol=1e-6)
    remove_addon(model)
    torch.testing.assert_close(_run(model, inputs), expected[None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
@pytest.mark.parametrize("order", ["offload_first", "addon_first"])
def test_group_offload_in_either_order(order: str, kind: str) -> None:
    """Block- and leaf-level group offload (onload and offload on the CPU, the only device here) with the add-on
    applied before or after: the levels still switch and match the unhooked model. An offloaded block is seen to
    compute on the onload device, where students applied after offloading are put (they stayed wherever the block's
    weights were stored between calls: the CPU, while an accelerator computes)."""
    case, plain, addon = _case()
    inputs = case.make_inputs(0)
    expected = _levels(plain, addon, inputs)
    model = case.model
    offload: dict = {"onload_device": torch.device("cpu"), "offload_type": kind}
    if kind == "block_level":
        offload["num_blocks_per_group"] = 1
    assert execution_device(model.transformer_blocks[1]) is None
    if order == "offload_first":
        model.enable_group_offload(**offload)
        apply_addon(model, addon, "a")
    else:
        apply_addon(model, addon, "a")
        model.enable_group_offload(**offload)
    assert execution_device(model.transformer_blocks[1]) == torch.device("cpu")
    for level in ("a", "b", None):
        set_level(model, level)
        torch.testing.assert_close(_run(model, inputs), expected[level], rtol=0, atol=1e-6)


def test_layerwise_casting_before_the_addon_is_built() -> None:
    """fp8 layerwise casting enabled on the base *before* the add-on is made: students are built from the hooked
    blocks (this crashed: ``cannot pickle 'module'``), hold no casting hooks and stay in full precision, equal to the
    teacher block's weights as the hooks compute with them; the levels run."""
    case = build_tiny("flux")
    model, inputs = case.model, case.make_inputs(0)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    student = addon.students["depth_1_3"]
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not any(hasattr(m, "_diffusers_hook") for m in student.modules())
    teacher = model.transformer_blocks[1]
    for name, p in student.named_parameters():
        torch.testing.assert_close(p, teacher.get_parameter(name).to(torch.float32), rtol=0, atol=0)
    base = _run(model, inputs)
    apply_addon(model, addon, "b")
    out = _run(model, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)
    set_level(model, None)
    assert torch.equal(_run(model, inputs), base)


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage"])
@pytest.mark.parametrize("hook", ["cache", "group_offload_block", "group_offload_leaf"])
def test_hooks_at_width_levels(hook: str, name: str) -> None:
    """FirstBlockCache and group offloading (block level before applying, leaf level after: every modulation layer of
    an FFN-mapped block then runs through its own hook) at the depth + width levels equal the unhooked model."""
    from diffusers import FirstBlockCacheConfig

    case = build_tiny(name)
    model, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    expected = _levels(model, addon, inputs, (None, "w", "dw"))
    if hook == "group_offload_block":
        model.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        )
    apply_addon(model, addon)
    if hook == "group_offload_leaf":
        model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    if hook == "cache":
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    for level in ("w", "dw", None):
        set_level(model, level)
        context = "cond" if hook == "cache" else None
        torch.testing.assert_close(_run(model, inputs, context), expected[level], rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
def test_layerwise_casting_at_width_levels(name: str) -> None:
    """fp8 layerwise casting on a base with a depth + width add-on: the width levels run (FFN-mapped blocks of
    Qwen-Image read modulation rows straight from the fp8-stored ``img_mod.1`` weight: a dtype error; diffusers never
    casts FLUX.1's and SD3's ``norm1.linear``) and equal a plain copy whose cast layers hold the fp8-rounded weights
    the hooks compute with."""
    case = build_tiny(name)
    model, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    rounded = copy.deepcopy(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast = [n for n, m in model.named_modules() if "_diffusers_hook" in m.__dict__]
    assert any(n.endswith("img_mod.1") for n in cast) == (name == "qwenimage")  # modulation layers cast
    for module_name in cast:
        for p in rounded.get_submodule(module_name).parameters(recurse=False):
            p.copy_(p.to(torch.float8_e4m3fn).to(torch.float32))
    apply_addon(model, addon)
    apply_addon(rounded, addon)
    for level in ("w", "dw"):
        set_level(model, level)
        set_level(rounded, level)
        torch.testing.assert_close(_run(model, inputs), _run(rounded, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3", "wan"])
def test_fullgraph_compile_at_every_level(name: str) -> None:
    """``torch.compile(fullgraph=True)`` (the eager backend: it fails on any graph break) at level None, a partial
    level and the full level gives the eager outputs. Level None failed before (``type(block).forward``)."""
    case, plain, addon = _case(name)
    inputs = case.make_inputs(0)
    expected = _levels(plain, addon, inputs)
    model = case.model
    apply_addon(model, addon)
    for level in (None, "a", "b"):
        set_level(model, level)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(_run(compiled, inputs), expected[level], rtol=0, atol=1e-6)


def test_a_wrapper_added_after_applying_survives_and_removal_is_exact() -> None:
    """A later instance-level wrapper of a dispatched block (what accelerate and other libraries add) keeps the
    dispatch under it; ``remove_addon`` then restores the original model exactly, wrapper and all."""
    case, plain, addon = _case()
    inputs = case.make_inputs(0)
    expected = _levels(plain, addon, inputs)
    model = case.model
    apply_addon(model, addon, "b")
    block = model.transformer_blocks[1]
    inner = block.forward
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    block.forward = wrapper
    torch.testing.assert_close(_run(model, inputs), expected["b"], rtol=0, atol=1e-6)
    remove_addon(model)
    torch.testing.assert_close(_run(model, inputs), expected[None], rtol=0, atol=1e-6)
    assert len(calls) == 2 and type(block).__name__ == "FluxTransformerBlock"


def flux_pipeline_and_addon(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny FLUX.1 pipeline folder and a saved add-on for it (level ``b``: spans [1:3], [3:5]; perturbed)."""
    folder = build_flux(tmp_path / "flux")
    base = ppcl.load_pipeline(folder).transformer
    addon = PruningAddon.from_plan(base, two_span_plan(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    addon.save_pretrained(tmp_path / "addon")
    return folder, tmp_path / "addon"


def flux_image(pipe) -> torch.Tensor:
    """A 16x16 image of the tiny FLUX.1 pipeline, 2 steps, seeded: ``(1, 16, 16, 3)`` in ``[0, 1]``."""
    out = pipe(prompt="a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    return torch.from_numpy(out)


def _offload(pipe, kind: str) -> None:
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        # What enable_sequential_cpu_offload does to each component. The pipeline method itself fails on a CPU
        # execution device (diffusers 0.42.1 + accelerate 1.16, without ppcl: "new() received an invalid
        # combination of arguments"), and the CPU is the only device here.
        import accelerate

        accelerate.cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_with_the_addon(offload: str, tmp_path: Path) -> None:
    """``enable_model_cpu_offload`` / sequential offload (accelerate's ``cpu_offload``, as
    ``enable_sequential_cpu_offload`` applies it; the execution device is the CPU here, the only one) with an add-on:
    the images of the unhooked pipeline. Sequential offload keeps the
    weights on ``meta`` inside its hooks: an add-on built or loaded from such a base reads them back (students were
    all ``meta``), and applying moved the students to ``meta`` too (their weights lost). Offloading sequentially
    *after* applying is refused clearly at the first call (accelerate failed with a bare ``KeyError``); model
    offload works in either order."""
    folder, addon_folder = flux_pipeline_and_addon(tmp_path)
    expected = flux_image(ppcl.load_pipeline(folder, addon_folder, level="b"))
    pipe = ppcl.load_pipeline(folder)
    _offload(pipe, offload)
    addon = PruningAddon.from_pretrained(addon_folder, pipe.transformer)
    assert not any(p.is_meta for p in addon.parameters())
    if offload == "sequential":  # an add-on made from the offloaded base starts from the real teacher weights
        made = PruningAddon.from_plan(pipe.transformer, two_span_plan(pipe.transformer))
        plain = PruningAddon.from_plan(ppcl.load_pipeline(folder).transformer, two_span_plan(pipe.transformer))
        for (name, p), q in zip(made.state_dict().items(), plain.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    apply_addon(pipe.transformer, addon, "b")
    torch.testing.assert_close(flux_image(pipe), expected, rtol=0, atol=1e-6)
    later = ppcl.load_pipeline(folder, addon_folder, level="b")
    _offload(later, offload)
    if offload == "model":
        torch.testing.assert_close(flux_image(later), expected, rtol=0, atol=1e-6)
    else:
        with pytest.raises(PPCLError, match="offloaded after it was applied"):
            flux_image(later)


@pytest.mark.parametrize("name", ["flux", "qwenimage"])
def test_regional_compile_at_every_level(name: str) -> None:
    """diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``, the eager backend) after
    ``apply_addon`` gives the eager outputs at every depth and width level; ``remove_addon`` leaves plain blocks
    compiled the plain way. Before, the whole call of each dispatched block at each level was its own graph, all on
    one code object: the tiny FLUX.1 hit torch's recompile limit at its third level (``FailOnRecompileLimitHit``).
    Width-modified blocks run a compiled copy of their mode's computation."""
    case = build_tiny(name)
    model, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    reference = copy.deepcopy(model)
    apply_addon(reference, copy.deepcopy(addon))
    levels = (None, "d", "w", "dw", None)
    expected = {}
    for level in levels:
        set_level(reference, level)
        expected[level] = _run(reference, inputs)
    apply_addon(model, addon)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    for level in levels:
        set_level(model, level)
        torch.testing.assert_close(_run(model, inputs), expected[level], rtol=0, atol=1e-6)
    remove_addon(model)
    assert all(b._compiled_call_impl is not None for b in model.transformer_blocks)
    torch.testing.assert_close(_run(model, inputs), expected[None], rtol=0, atol=1e-6)


def test_regional_compile_makes_few_graphs_whatever_the_blocks() -> None:
    """A 16-block Qwen-Image with 4 spans (8 blocks skipped): every level runs on at most 3 graphs, so the recompile
    limit is never near (each dispatched block was its own graph at each level), and compiling a block on its own
    before applying is refused clearly (the dispatch would then sit inside its graph)."""
    from diffusers import QwenImageTransformer2DModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=16, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))  # fmt: skip
    model, inputs = QwenImageTransformer2DModel(**config), _qwen_inputs(0)
    spans = [DepthReplacement(Span(a, b)) for a, b in ((1, 4), (4, 7), (8, 11), (11, 14))]
    plan = PruningPlan("qwenimage", type(model).__name__, (16,), spans,
                       [Level("a", (spans[0].id, spans[2].id)), Level("b", tuple(s.id for s in spans))],
                       protect_first=1, protect_last=1).validate()  # fmt: skip
    addon = PruningAddon.from_plan(model, plan)
    expected = _levels(model, addon, inputs)
    apply_addon(model, addon)
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    for level in ("a", "b", None):
        set_level(model, level)
        torch.testing.assert_close(_run(model, inputs), expected[level], rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    remove_addon(model)  # its blocks are compiled the plain way now
    with pytest.raises(ConfigError, match="compiled on its own"):
        apply_addon(model, addon)


@pytest.mark.parametrize("name", ["flux", "qwenimage", "sd3"])
def test_fullgraph_compile_at_width_levels_and_of_width_merges(name: str) -> None:
    """``torch.compile(fullgraph=True)`` (eager backend) at the width levels of an add-on and of the width-merged
    model gives the eager outputs. Text-pruned blocks of Qwen-Image and SD3 failed to trace ("Unsupported method
    call": their attention view was passed as ``self`` to the attention class's ``forward``)."""
    case = build_tiny(name)
    model, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(model, width_plan(model))
    _perturb(addon)
    merged = merge(model, addon, "dw")
    apply_addon(model, addon)
    for level in ("w", "dw"):
        set_level(model, level)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(_run(compiled, inputs), _run(model, inputs), rtol=0, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(merged, fullgraph=True, backend="eager")
    torch.testing.assert_close(_run(compiled, inputs), _run(merged, inputs), rtol=0, atol=1e-6)


def _many_modes_plan(model: torch.nn.Module) -> PruningPlan:
    """20-block Qwen-Image: four text runs and FFN maps on anchors, pruned, last and full blocks (11 width modes)."""
    from ppcl.plan.width import FFNLinear
    from ppcl.plan.width_select import with_width_level

    span = DepthReplacement(Span(17, 19))
    plan = PruningPlan("qwenimage", type(model).__name__, (20,), [span], [Level("d", (span.id,))],
                       protect_first=1, protect_last=1)  # fmt: skip
    image = ("image",)
    ffn = [1, FFNLinear(2, image), FFNLinear(6, image), FFNLinear(7, image), FFNLinear(8, image),
           FFNLinear(11, image), 12, FFNLinear(13, image), 16]  # fmt: skip
    return with_width_level(plan, "w", [(1, 3), (4, 7), (8, 11), (12, 15)], ffn, base_level="d")


def test_regional_compile_of_width_levels_and_merges_stays_under_the_recompile_limit() -> None:
    """Width-modified blocks under regional compilation run compiled, one copy of the computation per mode (each its
    own code object), so a plan with many modes stays far under torch's recompile limit, here lowered to 4: in add-on
    mode they ran eagerly; a width-merged model compiled each block's whole call, one graph per mode on one code object
    (9 entries for this plan: over the lowered limit, and near the real one, 8)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=20, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))  # fmt: skip
    model, inputs = QwenImageTransformer2DModel(**config), _qwen_inputs(0)
    addon = PruningAddon.from_plan(model, _many_modes_plan(model))
    _perturb(addon)
    merged = merge(model, addon, "w")
    expected = _levels(model, addon, inputs, (None, "d", "w"))
    torch.testing.assert_close(_run(merged, inputs), expected["w"], rtol=0, atol=1e-5)
    apply_addon(model, addon)
    with torch._dynamo.config.patch(recompile_limit=4):
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        merged.compile_repeated_blocks(fullgraph=True, backend="eager")
        for level in ("w", "d", None):
            set_level(model, level)
            torch.testing.assert_close(_run(model, inputs), expected[level], rtol=0, atol=1e-6)
        torch.testing.assert_close(_run(merged, inputs), expected["w"], rtol=0, atol=1e-5)
