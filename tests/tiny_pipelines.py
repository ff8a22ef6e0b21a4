"""Tiny but real diffusers pipelines (Flux, SD3, Qwen-Image) built from configs, for offline end-to-end tests.

Every component is a stock diffusers / transformers class with a tiny config and random weights; tokenizers are
word-level ``tokenizers`` objects built from a fixed vocabulary and wrapped in ``PreTrainedTokenizerFast``, so nothing
is ever downloaded. Each builder saves the pipeline with ``save_pretrained`` and returns the folder.

Qwen-Image gets a tiny ``Qwen2_5_VLForConditionalGeneration`` and a word-level tokenizer whose pre-tokenizer splits the
pipeline's chat template into exactly the 34 tokens the pipeline drops (``prompt_template_encode_start_idx``), as the
real Qwen2 tokenizer does. ``build_qwen(..., text_encoder=False)`` saves the embeddings-only variant instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
    "on",
    "the",
    "left",
    "of",
    "right",
    "above",
    "below",
    "photo",
    "with",
    "and",
    "in",
    "sky",
    "grass",
]
CLIP_DIM = 16
T5_DIM = 32
TOKENS = 8  # T5 sequence length the tests pass as max_sequence_length


def tiny_tokenizer(model_max_length: int = 77):
    """A word-level fast tokenizer over :data:`WORDS` that appends ``</s>`` (id 2) and pads with id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>", "<s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=model_max_length,
    )


def _clip(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # eos_token_id tells the pooler which token to pool (our tokenizer's </s>), instead of the legacy argmax rule.
    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=CLIP_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_DIM,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=2,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 4,
        d_model=T5_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two resolutions → VAE scale factor 2; shift/scale as SD3 and Flux read them from the config.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.0,
        shift_factor=0.0,
    ).eval()


def build_flux(folder: str | Path, num_layers: int = 3, num_single_layers: int = 3) -> Path:
    """A tiny ``FluxPipeline`` (CLIP + T5 + AutoencoderKL) saved to ``folder``; sample at 16x16."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(1),
        text_encoder=_clip(False, 2),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(3),
        tokenizer_2=tiny_tokenizer(TOKENS),
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def build_sd3(folder: str | Path, num_layers: int = 6) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` (2 CLIP + T5 + AutoencoderKL) saved to ``folder``; sample at 16x16."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_DIM,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1),
        text_encoder=_clip(True, 2),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_clip(True, 4),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(3),
        tokenizer_3=tiny_tokenizer(TOKENS),
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def qwen_tokenizer():
    """A word-level tokenizer for QwenImagePipeline: template words, ``\\n`` and punctuation are tokens of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template = [
        "system",
        "Describe",
        "the",
        "image",
        "by",
        "detailing",
        "color",
        "shape",
        "size",
        "texture",
        "quantity",
        "text",
        "spatial",
        "relationships",
        "of",
        "objects",
        "and",
        "background",
        "user",
        "assistant",
    ]
    vocab: dict[str, int] = {}
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", ",", ":", *template, *WORDS]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Keeping "\n" and punctuation as tokens makes the template prefix 34 tokens long, like Qwen2's BPE.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def qwen_text_encoder(vocab_size: int, hidden: int = 16):
    """A tiny Qwen2.5-VL (2 text layers, 1 vision layer) with multimodal RoPE sections summing to head_dim / 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(5)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": [0],
    }
    # Image/video marker ids outside the vocabulary: the pipeline never sends images to the encoder.
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab_size + 1,
        video_token_id=vocab_size + 2,
        vision_start_token_id=vocab_size + 3,
        vision_end_token_id=vocab_size + 4,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_transformer_and_vae(num_layers: int, zero_cond_t: bool = False):
    """The tiny Qwen-Image transformer (seeded) and VAE of :func:`build_qwen`."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=zero_cond_t,
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return transformer, vae


def build_qwen(folder: str | Path, num_layers: int = 6, text_encoder: bool = True) -> Path:
    """A tiny ``QwenImagePipeline`` saved to ``folder``; sample at 32x32.

    ``text_encoder=False`` saves it without text encoder / tokenizer (``[null, null]`` in ``model_index.json``): it
    then takes prompt embeddings only (see :func:`qwen_prompt_embeds`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer, vae = _qwen_transformer_and_vae(num_layers)
    tokenizer = qwen_tokenizer() if text_encoder else None
    encoder = qwen_text_encoder(len(tokenizer)) if tokenizer is not None else None
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def build_qwen_edit_plus(folder: str | Path, num_layers: int = 6) -> Path:
    """A tiny ``QwenImageEditPlusPipeline`` with the Edit-2511 transformer (``zero_cond_t=True``) and no text encoder,
    saved to ``folder``: it takes prompt embeddings (:func:`qwen_prompt_embeds`) and condition images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    transformer, vae = _qwen_transformer_and_vae(num_layers, zero_cond_t=True)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def qwen_prompt_embeds(n_prompts: int = 2, dim: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per-prompt keyword arguments for the embeddings-only Qwen pipeline (positive and negative)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt_embeds": torch.randn(1, 4 + i, dim, generator=g),
            "prompt_embeds_mask": torch.ones(1, 4 + i, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 3, dim, generator=g),
            "negative_prompt_embeds_mask": torch.ones(1, 3, dtype=torch.long),
        }
        for i in range(n_prompts)
    ]


def build_wan(folder: str | Path, num_layers: int = 6) -> Path:
    """A tiny ``WanPipeline`` (UMT5 text encoder, Wan VAE, ``WanTransformer3DModel``) saved to ``folder``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(WORDS) + 4,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=2,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    from tiny_models import WAN_TINY

    transformer = WanTransformer3DModel(**{**WAN_TINY, "num_layers": num_layers}).eval()
    pipe = WanPipeline(
        tokenizer=tiny_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def build_flux2_klein(folder: str | Path, num_layers: int = 3, num_single_layers: int = 3) -> Path:
    """A tiny ``Flux2KleinPipeline`` (Qwen3 text encoder, FLUX.2 VAE with its latent BatchNorm,
    ``Flux2Transformer2DModel`` without guidance embedding, as FLUX.2-klein) saved to ``folder``. The Qwen3 has 27
    layers of width 16, so the pipeline's default ``text_encoder_out_layers`` (9, 18, 27) exist."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(WORDS) + 4,
            hidden_size=hidden,
            intermediate_size=32,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=0,
        )
    ).eval()
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    from tiny_models import FLUX2_TINY

    # in_channels 16: 4 latent channels, 2x2-patchified; the prompt embedding stacks three encoder layers.
    config = {"num_layers": num_layers, "num_single_layers": num_single_layers, "joint_attention_dim": hidden * 3}
    transformer = Flux2Transformer2DModel(**{**FLUX2_TINY, **config, "guidance_embeds": False}).eval()
    tokenizer = tiny_tokenizer(16)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def build_hunyuan15(folder: str | Path) -> Path:
    """A tiny ``HunyuanVideo15Pipeline`` (text-to-video, classifier-free guider) without its text encoders, saved to
    ``folder``: it takes both prompt embeddings (:func:`hunyuan15_prompt_embeds`). Its pipeline has no step callback."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    from tiny_models import build_tiny

    transformer = build_tiny("hunyuanvideo15").model  # in_channels 9 = 4 latent + 4 condition + 1 mask
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def hunyuan15_prompt_embeds(n_prompts: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per-prompt keyword arguments for :func:`build_hunyuan15`: MLLM (16-d) and ByT5 (8-d) embeddings, positive and
    negative, with masks."""
    g = torch.Generator().manual_seed(seed)

    def pair(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, n, dim, generator=g), torch.ones(1, n, dtype=torch.long)

    out = []
    for i in range(n_prompts):
        (pe, pm), (pe2, pm2), (ne, nm), (ne2, nm2) = pair(5 + i, 16), pair(3, 8), pair(3, 16), pair(2, 8)
        out.append({
            "prompt_embeds": pe, "prompt_embeds_mask": pm, "prompt_embeds_2": pe2, "prompt_embeds_mask_2": pm2,
            "negative_prompt_embeds": ne, "negative_prompt_embeds_mask": nm,
            "negative_prompt_embeds_2": ne2, "negative_prompt_embeds_mask_2": nm2,
        })  # fmt: skip
    return out
