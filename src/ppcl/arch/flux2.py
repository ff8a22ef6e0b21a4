"""ArchSpec of diffusers ``Flux2Transformer2DModel`` (FLUX.2-dev: 8 double-stream then 48 single-stream blocks, 32B;
FLUX.2-klein 4B / 9B: 5 + 20 and 8 + 24).

Both stacks form one flat depth axis, like FLUX.1's, but the blocks are called differently:

* A double block ``Flux2TransformerBlock`` takes the two streams as keywords (positionally on the
  gradient-checkpointing path) and returns ``(encoder_hidden_states, hidden_states)``, text first.
* Between the stacks the model concatenates ``[text; image]``; a single block ``Flux2SingleTransformerBlock`` is
  called with that joint sequence ``(B, N_txt + N_img, D)`` as ``hidden_states``, ``encoder_hidden_states=None``, and
  returns it as one bare tensor. The text length is never passed to the block (``joined_text``): the analysis takes
  it from the model input.
* Modulation is model-level: ``double_stream_modulation_img/_txt`` and ``single_stream_modulation`` turn ``temb``
  into ``temb_mod_img``/``temb_mod_txt`` ``(B, 6D)`` and ``temb_mod`` ``(B, 3D)``, shared by every block of a stack.
  Blocks hold no position-dependent parameter, so a student copied from a block is a block like any other and a depth
  merge is a config rewrite (``num_layers``, ``num_single_layers``).

Width kinds do not apply: text-run pruning needs per-block text modulation (it is shared here) and a width forward
for these blocks, and the single blocks fuse their MLP into ``to_qkv_mlp_proj``/``to_out``. Plans hold depth spans.
Calibration from ``Flux2KleinKVPipeline``'s KV-cache mode is not supported (the model mutates one attention-kwargs dict
per block, so recorded calls would share it).
"""

from __future__ import annotations

from typing import Any

import torch

from ppcl.arch.latents import Cast, LatentFormat
from ppcl.arch.spec import ArchSpec, ModelInputs, StackSpec

FLUX2_DOUBLE_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "temb_mod_img",
    "temb_mod_txt",
    "image_rotary_emb",
    "joint_attention_kwargs",
)
FLUX2_SINGLE_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "temb_mod",
    "image_rotary_emb",
    "joint_attention_kwargs",
    "split_hidden_states",
    "text_seq_len",
)


class Flux2Latents(LatentFormat):
    """FLUX.2 (``Flux2Pipeline``, ``Flux2KleinPipeline``): the VAE's latents 2x2-patchified and normalised by the VAE's
    own BatchNorm running statistics, packed one token per patch with 4-D ``(T, H, W, L)`` ids; prompt embeddings of
    stacked text-encoder layers with ``txt_ids``; timestep σ; the time shift's ``mu`` from the pipelines' empirical
    formula.

    The cache stores the normalised latents *unpatchified*, ``(C, h, w)`` like FLUX.1's, so bucket sides and token
    counts follow the same 2x2 rule; the training noise is drawn per element, so the layout changes nothing.
    """

    inference_steps: int = 50
    """Steps the empirical ``mu`` assumes: the pipelines' default ``num_inference_steps`` (FLUX.2-klein's distilled
    checkpoints sample in 4; their σ are then shifted a little less at inference than in training)."""

    def normalisation(self, vae_config: Any) -> dict[str, Any]:
        return {
            "kind": "(patchify(z) - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps), stored unpatchified",
            "batch_norm_eps": vae_config.batch_norm_eps,
        }

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        with torch.no_grad():
            z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return _normalised(pipe, z)

    def encode_prompts(self, pipe: Any, prompts: list[str], kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        pe, _ = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, **kwargs)
        return [{"prompt_embeds": pe[i].cpu()} for i in range(len(pe))]

    def unpack_generated(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # The pipelines return latents already un-normalised and unpatchified (what the VAE decodes).
        return _normalised(pipe, latents)

    def shift_mu(self, image_seq_len: int, scheduler_config: dict[str, Any]) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len, self.inference_steps)

    def model_inputs(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        data: dict[str, torch.Tensor],
        transformer: dict[str, Any],
        cast: Cast,
    ) -> dict[str, Any]:
        from diffusers import Flux2Pipeline

        patches = Flux2Pipeline._patchify_latents(x_t)  # (B, 4C, h/2, w/2)
        return {
            "hidden_states": cast(Flux2Pipeline._pack_latents(patches)),
            "encoder_hidden_states": cast(data["prompt_embeds"]),
            "timestep": cast(sigma),
            "img_ids": Flux2Pipeline._prepare_latent_ids(patches),
            "txt_ids": Flux2Pipeline._prepare_text_ids(data["prompt_embeds"]),
        }


def _normalised(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, h, w)`` → BatchNorm-normalised in the patchified space, returned unpatchified, float32."""
    from diffusers import Flux2Pipeline

    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    patches = Flux2Pipeline._patchify_latents(z.float())
    mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(patches) + eps)
    return Flux2Pipeline._unpatchify_latents((patches - mean) / std).cpu()


_ROLES: tuple[tuple[str, str], ...] = (("rotary", "image_rotary_emb"), ("attention_kwargs", "joint_attention_kwargs"))

FLUX2_SPEC = ArchSpec(
    name="flux2",
    model_class_name="Flux2Transformer2DModel",
    stacks=(
        StackSpec(
            attr="transformer_blocks",
            block_class_name="Flux2TransformerBlock",
            config_key="num_layers",
            input_names=FLUX2_DOUBLE_INPUTS,
            roles=_ROLES,
            dual_stream=False,  # see the module docstring: no width kinds
        ),
        StackSpec(
            attr="single_transformer_blocks",
            block_class_name="Flux2SingleTransformerBlock",
            config_key="num_single_layers",
            input_names=FLUX2_SINGLE_INPUTS,
            output_order=("image",),
            roles=_ROLES,
            bare_output=True,
            joined_text=True,
            dual_stream=False,
        ),
    ),
    # The pipelines pass ids as (B, N, 4) (the model reads the first row), so they split per sample like the streams.
    model_inputs=ModelInputs(
        batched=("hidden_states", "encoder_hidden_states", "timestep", "guidance", "img_ids", "txt_ids"),
    ),
    latents=Flux2Latents(),
)
