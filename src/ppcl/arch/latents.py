"""How a family's pipeline turns images and prompts into transformer inputs: the latent side of an :class:`ArchSpec`.

A :class:`LatentFormat` holds what a latent cache (:mod:`ppcl.data.latent_cache`) and its training batches
(:mod:`ppcl.distill.latent_data`) need to know about one family, all of it the pipeline's own conventions: how the
VAE's latents are normalised, how prompts are encoded, how many latent pixels make one image token, how the pipeline
packs latents and calls the transformer, and the scheduler defaults it assumes. Each family's arch file defines its
format (FLUX.1, SD3/3.5, Qwen-Image); a family without one cannot build a latent cache (it can still be calibrated
from prompts).

Shapes: latents ``(B, C, h, w)`` normalised float32; packed latents ``(B, h/2 · w/2, 4C)``; prompt embeddings
``(T, D_text)`` per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Cast = Callable[[torch.Tensor], torch.Tensor]


class LatentFormat:
    """One family's latent conventions; the methods take the diffusers pipeline (or its configs) they read."""

    max_shift_default: float = 1.15
    """The scheduler's ``max_shift`` when its config leaves it out (the family pipeline's own default)."""

    def shift_mu(self, image_seq_len: int, scheduler_config: dict[str, Any]) -> float:
        """``mu`` of the scheduler's dynamic time shift for ``image_seq_len`` image tokens: linear in the token count
        between the config's base and max shift (FLUX.1, SD3.5, Qwen-Image pipelines' ``calculate_shift``)."""
        c = scheduler_config
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", self.max_shift_default)
        slope = (top - base) / (max_len - base_len)
        return image_seq_len * slope + base - slope * base_len

    def token_patch(self, transformer_config: dict[str, Any]) -> int:
        """Latent pixels per image-token side (2 for 2x2-packed latents, else the transformer's ``patch_size``)."""
        return 2

    def normalisation(self, vae_config: Any) -> dict[str, Any]:
        """The VAE normalisation, as recorded in the cache manifest."""
        return {
            "kind": "(z - shift_factor) * scaling_factor",
            "shift_factor": vae_config.get("shift_factor") or 0.0,
            "scaling_factor": vae_config.scaling_factor,
        }

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)`` float32 of images ``(B, 3, H, W)`` in ``[-1, 1]`` (posterior mode)."""
        vae = pipe.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return ((z - shift) * vae.config.scaling_factor).float().cpu()

    def encode_prompts(self, pipe: Any, prompts: list[str], kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per-prompt embeddings through ``pipe.encode_prompt`` (``kwargs``: e.g. ``max_sequence_length``)."""
        raise NotImplementedError

    def unpack_generated(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result as ``(B, C, h, w)`` (unchanged when not packed)."""
        return latents

    def model_inputs(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        data: dict[str, torch.Tensor],
        transformer: dict[str, Any],
        cast: Cast,
    ) -> dict[str, Any]:
        """The transformer's keyword arguments for noised latents ``x_t`` ``(B, C, h, w)`` at ``sigma`` ``(B,)``, as
        the pipeline calls it (``data``: the batch's cached prompt tensors; ``cast``: to the training dtype)."""
        raise NotImplementedError


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """FLUX.1 / Qwen-Image ``_pack_latents``: ``(B, C, h, w)`` → ``(B, h/2 · w/2, 4C)`` (2x2 patches)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)
