"""The toy teacher: a real diffusers ``QwenImageTransformer2DModel`` on 4x4 pixel patches of ShapesWorld images.

A :class:`ToyTeacher` bundles the transformer, the toy text encoder and the tokenizer. Images are packed exactly the
way ``QwenImagePipeline`` packs latents (channel-major inside each patch), with the 3 RGB channels standing in for
the VAE's latent channels, so every ppcl code path sees the same tensor layout as on the real model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from ppcl.errors import ArtefactError
from ppcl.io import atomic_file, write_json
from ppcl.toy.text_encoder import ToyTextEncoder
from ppcl.toy.tokenizer import WordTokenizer
from ppcl.toy.world import IMAGE_SIZE

PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 8 x 8 = 64 image tokens
TEXT_DIM = 64

#: Config of the committed toy teacher. 16 dual-stream blocks of width 128 (4 heads x 32).
TEACHER_CONFIG: dict[str, Any] = {
    "patch_size": PATCH,
    "in_channels": 3 * PATCH * PATCH,
    "out_channels": 3,
    "num_layers": 16,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": TEXT_DIM,
    "axes_dims_rope": (8, 12, 12),
}

ASSETS = Path(__file__).parent / "assets"
TRANSFORMER_FILE = "toy_teacher.safetensors"
TEXT_ENCODER_FILE = "toy_text_encoder.safetensors"
CARD_FILE = "toy_teacher.json"
#: Committed teachers by name: the default 16-block one and the deeper, more redundant 24-block one (issue 13).
COMMITTED = {"toy16": ASSETS, "toy24": ASSETS / "toy24"}


def teacher_folder(name_or_folder: str | os.PathLike[str] | None) -> Path | None:
    """The folder of a committed teacher named in :data:`COMMITTED`, else ``name_or_folder`` as a path (None: the
    default teacher)."""
    if name_or_folder is None:
        return None
    return COMMITTED.get(str(name_or_folder), Path(name_or_folder))


def patchify(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` → tokens ``(B, 64, 48)``, each token one 4x4 patch laid out (C, ph, pw)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, 64, 48)`` → images ``(B, 3, 32, 32)``; the inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, GRID, GRID, 3, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)


def img_shapes(batch: int) -> list[list[tuple[int, int, int]]]:
    """The ``img_shapes`` argument of the transformer: one (frames, rows, cols) grid per sample."""
    return [[(1, GRID, GRID)]] * batch


@dataclass
class ToyTeacher:
    """The toy world's diffusion model: transformer + frozen text encoder + tokenizer."""

    transformer: QwenImageTransformer2DModel
    text_encoder: ToyTextEncoder
    tokenizer: WordTokenizer

    @classmethod
    def build(cls, seed: int = 0, config: dict[str, Any] | None = None) -> ToyTeacher:
        """A freshly initialised (untrained) teacher; weights depend only on ``seed``."""
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**(config or TEACHER_CONFIG))
        tokenizer = WordTokenizer()
        text_encoder = ToyTextEncoder(len(tokenizer), dim=transformer.config.joint_attention_dim)
        return cls(transformer, text_encoder, tokenizer)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → prompt embeddings ``(B, T, 64)`` and mask ``(B, T)`` (no gradient; the encoder is frozen)."""
        return self.embed(captions)

    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`encode_prompts` but keeps the graph (used while training the teacher)."""
        ids, mask = self.tokenizer(captions)
        device = next(self.text_encoder.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        return self.text_encoder(ids, mask), mask

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> torch.Tensor:
        """Predicted velocity (ε − x0) ``(B, 64, 48)`` for noisy tokens ``x_t`` ``(B, 64, 48)`` at times ``t`` ``(B,)``."""
        return velocity(self.transformer, x_t, t, prompt_embeds, prompt_mask)

    def save(self, folder: str | os.PathLike[str], card: dict[str, Any] | None = None) -> None:
        """Write fp16 weights of both networks (and the JSON card) to ``folder``, atomically per file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _save_half(
            self.transformer.state_dict(),
            folder / TRANSFORMER_FILE,
            {"config": json.dumps(_jsonable(dict(self.transformer.config)))},
        )
        _save_half(
            self.text_encoder.state_dict(),
            folder / TEXT_ENCODER_FILE,
            {"config": json.dumps(self.text_encoder.config())},
        )
        if card is not None:
            write_json(card, folder / CARD_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> ToyTeacher:
        """Load a teacher saved by :meth:`save` (default: the committed one), upcast to ``dtype``."""
        folder = Path(folder) if folder is not None else ASSETS
        t_path, e_path = folder / TRANSFORMER_FILE, folder / TEXT_ENCODER_FILE
        for path in (t_path, e_path):
            if not path.is_file():
                raise ArtefactError(
                    "toy teacher weights are missing",
                    expected=f"{path.name} in {folder}",
                    found="no such file",
                    fix="run `ppcl toy train-teacher --out DIR` or reinstall ppcl",
                )
        t_state, t_meta = _load(t_path)
        e_state, e_meta = _load(e_path)
        config = {k: v for k, v in json.loads(t_meta["config"]).items() if not k.startswith("_")}
        transformer = QwenImageTransformer2DModel(**config)
        transformer.load_state_dict({k: v.to(dtype) for k, v in t_state.items()}, strict=True)
        tokenizer = WordTokenizer()
        text_encoder = ToyTextEncoder(**json.loads(e_meta["config"]))
        text_encoder.load_state_dict({k: v.to(dtype) for k, v in e_state.items()}, strict=True)
        if dtype != torch.float32:  # diffusers warns about .to(dtype) even when nothing changes
            transformer.to(dtype)
            text_encoder.to(dtype)
        transformer.eval().requires_grad_(False)
        text_encoder.eval().requires_grad_(False)
        return cls(transformer, text_encoder, tokenizer)


def load_card(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The JSON card of a saved teacher (default: the committed one)."""
    path = (Path(folder) if folder is not None else ASSETS) / CARD_FILE
    return json.loads(path.read_text())


def velocity(
    transformer: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
) -> torch.Tensor:
    """Run ``transformer`` (teacher or a pruned variant) on toy inputs; returns ``(B, 64, 48)``."""
    out = transformer(
        hidden_states=x_t,
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_mask=prompt_mask,
        timestep=t.to(x_t.dtype),
        img_shapes=img_shapes(x_t.shape[0]),
        return_dict=False,
    )
    return out[0]


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def _save_half(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(half, str(tmp), metadata=metadata)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:  # what a truncated or corrupt file raises
        raise ArtefactError(
            "cannot read a safetensors file",
            expected=f"a valid safetensors file at {path}",
            found=f"{type(exc).__name__}: {exc}",
            fix="re-create or re-download the file",
        ) from exc
