"""More diffusers model features with an add-on applied (issue 16's table): fused QKV projections, attention
backends, and the other caches (Pyramid Attention Broadcast, TaylorSeer) compose with the dispatch; a level switch
and removing the feature bring back exactly the plain level's output."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

from ppcl.addon import PruningAddon
from ppcl.runtime import apply_addon, set_level
from tiny_models import build_tiny, two_span_plan


def _applied():
    case = build_tiny("flux")
    model = case.model
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(0.02)
    plain = copy.deepcopy(model)
    apply_addon(plain, addon, "b")
    apply_addon(model, addon, "b")
    return model, plain, case.make_inputs(0)


def _out(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def test_fused_qkv_projections_and_attention_backends() -> None:
    model, plain, inputs = _applied()
    expected = _out(plain, inputs)
    model.fuse_qkv_projections()  # students are attention blocks too: diffusers fuses them with the base's
    torch.testing.assert_close(_out(model, inputs), expected, rtol=0, atol=1e-5)
    set_level(model, None)
    set_level(plain, None)
    torch.testing.assert_close(_out(model, inputs), _out(plain, inputs), rtol=0, atol=1e-5)
    set_level(model, "b")
    model.unfuse_qkv_projections()
    model.set_attention_backend("native")
    torch.testing.assert_close(_out(model, inputs), expected, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    "config",
    [
        lambda: diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
        ),
        lambda: diffusers.TaylorSeerCacheConfig(),
    ],
    ids=["pyramid_attention_broadcast", "taylorseer"],
)
def test_other_caches_run_on_a_level_and_leave_it_exact(config) -> None:
    model, plain, inputs = _applied()
    expected = _out(plain, inputs)
    model.enable_cache(config())
    with model.cache_context("cond"):
        for _ in range(3):  # a cache computes, then reuses
            assert torch.isfinite(_out(model, inputs)).all()
    set_level(model, None)  # a switch resets the cache's state
    set_level(model, "b")
    model.disable_cache()
    torch.testing.assert_close(_out(model, inputs), expected, rtol=0, atol=0)
