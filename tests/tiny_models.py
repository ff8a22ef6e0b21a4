"""Tiny *real* diffusers transformers (Qwen-Image and -Edit, FLUX.1, SD3, SD3.5; FLUX.2, Wan and HunyuanVideo-1.5 for
depth pruning) built from scratch configs, for tests.

No hub access; every model has 6 flat blocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TINY_ARCH_NAMES: tuple[str, ...] = ("qwenimage", "qwenimage_edit", "flux", "sd3", "sd35")
"""Families with every replacement kind (depth, text runs, FFN maps)."""
DEPTH_ONLY_ARCH_NAMES: tuple[str, ...] = ("flux2", "wan", "hunyuanvideo15")
"""Families ppcl prunes in depth only (no text stream to prune, no width forward yet)."""
ALL_ARCH_NAMES: tuple[str, ...] = TINY_ARCH_NAMES + DEPTH_ONLY_ARCH_NAMES

FLUX2_TINY: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 3, "num_single_layers": 3, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
}  # fmt: skip
"""The tiny ``Flux2Transformer2DModel`` config (3 double + 3 single blocks); pipelines and tests vary it."""
WAN_TINY: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
    "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 6, "cross_attn_norm": True, "rope_max_seq_len": 32,
}  # fmt: skip
"""The tiny ``WanTransformer3DModel`` config (6 blocks)."""


@dataclass
class TinyCase:
    """A tiny model plus a deterministic input batch for it."""

    name: str
    model: nn.Module
    make_inputs: Callable[[int], dict[str, Any]]

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's output sample for ``inputs``."""
        return self.model(**inputs, return_dict=False)[0]


def _qwen_inputs(seed: int, batch: int = 2, h: int = 4, w: int = 4, n_txt: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n_txt, dtype=torch.long)
    mask[1:, n_txt - 2 :] = 0  # padded text tokens in the second sample exercise the mask path
    return {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_txt, 16, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.rand(batch, generator=g),
        "img_shapes": [(1, h, w)] * batch,
    }


def _qwen_edit_inputs(seed: int, batch: int = 2, h: int = 4, w: int = 4, n_txt: int = 7) -> dict[str, Any]:
    """Qwen-Image-Edit(-Plus) style: the noisy target's tokens, then one condition image's, in one sequence."""
    inputs = _qwen_inputs(seed, batch, h, w, n_txt)
    g = torch.Generator().manual_seed(seed + 1000)
    condition = torch.randn(batch, h * w, 16, generator=g)
    return {**inputs, "hidden_states": torch.cat([inputs["hidden_states"], condition], 1),
            "img_shapes": [[(1, h, w), (1, h, w)]] * batch}  # fmt: skip


def _flux_inputs(seed: int, batch: int = 2, n_img: int = 16, n_txt: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    return {
        "hidden_states": torch.randn(batch, n_img, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_txt, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(n_txt, 3),
    }


def _sd3_inputs(seed: int, batch: int = 2, n_txt: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_txt, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }


def _flux2_inputs(seed: int, batch: int = 2, h: int = 4, w: int = 4, n_txt: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n_txt))
    return {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_txt, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),  # the pipelines pass t / 1000
        "guidance": torch.full((batch,), 4.0),
        "img_ids": img_ids.unsqueeze(0).expand(batch, -1, -1),  # (B, N, 4), as the pipelines pass them
        "txt_ids": txt_ids.unsqueeze(0).expand(batch, -1, -1),
    }


def _wan_inputs(seed: int, batch: int = 2, n_txt: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 2, 4, 4, generator=g),  # (B, C, F, H, W): 2 x 2 x 2 = 8 tokens
        "encoder_hidden_states": torch.randn(batch, n_txt, 16, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }


def _hunyuan15_inputs(seed: int, batch: int = 2, n_txt: int = 6, n_txt2: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask, mask2 = torch.ones(batch, n_txt, dtype=torch.long), torch.ones(batch, n_txt2, dtype=torch.long)
    mask[1:, n_txt - 2 :] = 0  # padded MLLM and ByT5 tokens exercise the mask path
    mask2[0, n_txt2 - 1 :] = 0
    return {
        "hidden_states": torch.randn(batch, 9, 2, 2, 2, generator=g),  # [latents 4, condition 4, mask 1]: 8 tokens
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(batch, n_txt, 16, generator=g),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, n_txt2, 8, generator=g),
        "encoder_attention_mask_2": mask2,
        "image_embeds": torch.zeros(batch, 3, 8),  # text-to-video: the image tokens are zero and masked
    }


def build_tiny(name: str) -> TinyCase:
    """Build the tiny model ``name`` (one of :data:`TINY_ARCH_NAMES`) with seeded weights."""
    torch.manual_seed(0)
    if name in ("qwenimage", "qwenimage_edit"):
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=6,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(8, 4, 4),
            zero_cond_t=name == "qwenimage_edit",  # Edit-2511: condition tokens are modulated at t = 0
        )
        make = _qwen_edit_inputs if name == "qwenimage_edit" else _qwen_inputs
    elif name == "flux":
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=3,
            num_single_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
        )
        make = _flux_inputs
    elif name in ("sd3", "sd35"):
        from diffusers import SD3Transformer2DModel

        extra: dict[str, Any] = {"dual_attention_layers": (0, 1, 2), "qk_norm": "rms_norm"} if name == "sd35" else {}
        model = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=6,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=16,
            **extra,
        )
        make = _sd3_inputs
    elif name == "flux2":
        from diffusers import Flux2Transformer2DModel

        model = Flux2Transformer2DModel(**FLUX2_TINY)
        make = _flux2_inputs
    elif name == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(**WAN_TINY)
        make = _wan_inputs
    elif name == "hunyuanvideo15":
        from diffusers import HunyuanVideo15Transformer3DModel

        model = HunyuanVideo15Transformer3DModel(
            in_channels=9,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=6,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=1,
            patch_size_t=1,
            qk_norm="rms_norm",
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=8,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),
        )
        make = _hunyuan15_inputs
    else:
        raise ValueError(name)
    return TinyCase(name=name, model=model.eval(), make_inputs=make)


def two_span_plan(model: nn.Module):
    """Spans [1:3] and [3:5] (half-open) of a 6-block tiny model; level "a" uses the first, "b" both."""
    from ppcl.arch import get_spec
    from ppcl.plan import DepthReplacement, Level, PruningPlan, Span

    spec = get_spec(model)
    reps = [DepthReplacement(Span(1, 3)), DepthReplacement(Span(3, 5), "middle")]
    levels = [Level("a", (reps[0].id,)), Level("b", (reps[0].id, reps[1].id))]
    return PruningPlan(
        spec.name, type(model).__name__, tuple(spec.stack_sizes(model)), reps, levels, protect_first=1, protect_last=1
    ).validate()
