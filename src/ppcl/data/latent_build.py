"""Building a latent cache (``ppcl cache``): encode images and prompts with the pipeline's own VAE and text
encoder(s), the family's way (:class:`~ppcl.arch.latents.LatentFormat`), and write the folder atomically. The layout
and the reader: :mod:`ppcl.data.latent_cache`.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ppcl.arch import get_spec
from ppcl.data.images import ImageRecord, assign_bucket, make_buckets, read_images, to_bucket
from ppcl.data.latent_cache import (
    EMPTY,
    ENCODERS,
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    TRANSFORMER_KEYS,
    stack_text,
)
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import (
    atomic_folder,
    config_hash,
    content_hash,
    save_tensors,
    write_json,
)
from ppcl.logging import get_logger, progress
from ppcl.outputs import LATENT_CACHE

log = get_logger("cache")


# ---------------------------------------------------------------- encoding (each family's LatentFormat, in ppcl.arch)


def vae_multiple(pipe: Any) -> int:
    """Bucket sides must be multiples of this: VAE scale factor x latent pixels per image token."""
    latents = get_spec(pipe.transformer).latent_format()
    return int(pipe.vae_scale_factor) * latents.token_patch(dict(pipe.transformer.config))


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int | None) -> list[dict[str, torch.Tensor]]:
    """Per-prompt embeddings through ``pipe.encode_prompt``: ``prompt_embeds (T, D)`` (+ ``pooled_prompt_embeds``),
    the family's way (:class:`~ppcl.arch.latents.LatentFormat`)."""
    kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    with torch.no_grad():
        return get_spec(pipe.transformer).latent_format().encode_prompts(pipe, prompts, kw)


def encode_images(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(B, C, h, w)`` float32 of images ``(B, 3, H, W)`` in ``[-1, 1]`` (posterior mode)."""
    return get_spec(pipe.transformer).latent_format().encode_images(pipe, pixels)


def generate_latents(
    pipe: Any, prompt: str, height: int, width: int, steps: int, seed: int, guidance: float | None
) -> torch.Tensor:
    """The teacher's final normalised latents ``(C, h, w)`` for ``prompt`` (``output_type="latent"``, unpacked)."""
    extra = {} if guidance is None else {"guidance_scale": guidance}
    with torch.no_grad():
        out = pipe(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(seed),
            **extra,
        ).images
    out = get_spec(pipe.transformer).latent_format().unpack_generated(pipe, out, height, width)
    return out[0].float().cpu()


def release_encoders(pipe: Any) -> None:
    """Drop the text encoder(s) and VAE from ``pipe`` and free their memory."""
    for name in ENCODERS:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- building


def pipeline_info(pipe: Any, path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Class, path and a hash of every component's config (what the cached data depends on)."""
    configs = {
        name: _config_dict(getattr(pipe, name).config)
        for name in sorted(pipe.components)
        if getattr(getattr(pipe, name, None), "config", None) is not None
    }
    classes = {name: type(c).__name__ for name, c in sorted(pipe.components.items()) if c is not None}
    transformer = pipe.transformer
    return {
        "class": type(pipe).__name__,
        "path": None if path is None else str(Path(path).resolve()),
        "hash": hashlib.sha256(
            json.dumps([config_hash(c) for c in configs.values()] + [classes], sort_keys=True).encode()
        ).hexdigest()[:16],
        "components": classes,
        "transformer_class": type(transformer).__name__,
        "transformer_config_hash": config_hash(dict(transformer.config)),
        "transformer": {k: _jsonable(transformer.config.get(k)) for k in TRANSFORMER_KEYS},
        "vae_scale_factor": int(pipe.vae_scale_factor),
    }


def _config_dict(config: Any) -> dict[str, Any]:
    """A diffusers FrozenDict or a transformers PretrainedConfig as a plain dict."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _encoder_settings(pipe: Any, max_sequence_length: int | None) -> dict[str, Any]:
    default = inspect.signature(pipe.encode_prompt).parameters.get("max_sequence_length")
    msl = max_sequence_length if max_sequence_length is not None else getattr(default, "default", None)
    norm = get_spec(pipe.transformer).latent_format().normalisation(pipe.vae.config)
    return {
        "max_sequence_length": msl,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "text_encoders": [type(getattr(pipe, n)).__name__ for n in ENCODERS[:3] if getattr(pipe, n, None)],
        "vae": type(pipe.vae).__name__,
        "latent_normalisation": norm,
        "posterior": "mode",
    }


@dataclass
class _Writer:
    """Writes shards of one bucket at a time into the temporary cache folder."""

    folder: Path
    shards: list[dict[str, Any]]

    def write(
        self, bucket: int, keys: list[str], latents: list[torch.Tensor], texts: list[dict[str, torch.Tensor]]
    ) -> None:
        tensors = {"latents": torch.stack(latents)}
        tensors.update(stack_text(texts))
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_tensors(tensors, self.folder / name)
        self.shards.append(
            {"file": name, "bucket": bucket, "count": len(keys), "keys": keys, "content_hash": content_hash(tensors)}
        )


@dataclass
class _Chunk:
    """Images of one bucket on their way into one cache shard: encoded ones, and pixels waiting for a full batch."""

    keys: list[str] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    texts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    waiting: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (caption, (3, H, W) pixels)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, record: ImageRecord, pixels: torch.Tensor) -> None:
        self.keys.append(record.key)
        self.waiting.append((record.caption, pixels))

    def encode(self, pipe: Any, max_sequence_length: int | None) -> None:
        """Encode the waiting images and captions as one batch."""
        if self.waiting:
            self.latents.extend(encode_images(pipe, torch.stack([p for _, p in self.waiting])))
            self.texts.extend(encode_prompts(pipe, [c for c, _ in self.waiting], max_sequence_length))
            self.waiting = []

    def write(self, pipe: Any, max_sequence_length: int | None, writer: _Writer, bucket: int) -> None:
        self.encode(pipe, max_sequence_length)
        writer.write(bucket, self.keys, self.latents, self.texts)


def _check_out(out: str | os.PathLike[str]) -> None:
    if Path(out).exists():
        raise ArtefactError(
            "output folder already exists",
            expected="a new folder for the cache",
            found=str(out),
            fix="choose another --out or remove the folder",
        )


def build_image_cache(
    pipe: Any,
    records: list[ImageRecord],
    out: str | os.PathLike[str],
    resolution: int,
    *,
    pipeline_path: str | os.PathLike[str] | None = None,
    shard_size: int = 256,
    encode_batch: int = 8,
    max_sequence_length: int | None = None,
    free_encoders: bool = True,
    source: dict[str, Any] | None = None,
) -> Path:
    """Encode image + caption ``records`` once into a latent cache at ``out``; see the module docstring."""
    _check_out(out)
    if shard_size < 1 or encode_batch < 1:
        raise ConfigError(
            "shard and encode batch sizes must be positive",
            expected=">= 1",
            found=f"shard_size {shard_size}, encode_batch {encode_batch}",
        )
    buckets = make_buckets(resolution, vae_multiple(pipe))
    per_bucket: dict[int, list[ImageRecord]] = {}
    for record in records:
        per_bucket.setdefault(assign_bucket(record.size, buckets), []).append(record)
    log.info(
        "cache: %d images into buckets %s",
        len(records),
        {f"{buckets[b][0]}x{buckets[b][1]}": len(r) for b, r in sorted(per_bucket.items())},
    )
    pipe.set_progress_bar_config(disable=True)
    with atomic_folder(out, LATENT_CACHE) as tmp:
        writer = _Writer(tmp, [])
        pending: dict[int, _Chunk] = {}
        # Records are read in their order (each tar shard once) and encoded per bucket; a bucket's chunk is written
        # when it holds shard_size images, or, to keep about one shard in memory, when all pending ones together do.
        for record, image in progress(read_images(records), desc="cache", total=len(records)):
            # The decoded image's size is authoritative (the scan read headers only): see images._orientation.
            bucket = assign_bucket(image.size, buckets)
            chunk = pending.setdefault(bucket, _Chunk())
            chunk.add(record, to_bucket(image, buckets[bucket]))
            if len(chunk.waiting) >= encode_batch:
                chunk.encode(pipe, max_sequence_length)
            if len(chunk) >= shard_size or sum(len(c) for c in pending.values()) >= shard_size:
                fullest = max(pending, key=lambda b: (len(pending[b]), -b))
                pending.pop(fullest).write(pipe, max_sequence_length, writer, fullest)
        for bucket in sorted(pending):
            pending[bucket].write(pipe, max_sequence_length, writer, bucket)
        _finish(
            pipe,
            tmp,
            writer,
            buckets,
            resolution,
            pipeline_path,
            max_sequence_length,
            {"source": "images", **(source or {})},
        )
    if free_encoders:
        release_encoders(pipe)
    return Path(out)


def build_prompt_cache(
    pipe: Any,
    prompts: list[str],
    out: str | os.PathLike[str],
    resolution: int,
    *,
    pipeline_path: str | os.PathLike[str] | None = None,
    shard_size: int = 256,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance: float | None = None,
    max_sequence_length: int | None = None,
    free_encoders: bool = True,
) -> Path:
    """Generate one image per prompt with the teacher (square bucket) and cache its latents + prompt embeddings.

    Prompt ``i`` is sampled with the noise seed ``default_rng([seed, i]).integers(2**31)``.
    """
    _check_out(out)
    if not prompts:
        raise ConfigError(
            "no prompts to generate from",
            expected="a non-empty prompt list",
            found="none",
            fix="pass --prompts FILE with one prompt per line",
        )
    buckets = make_buckets(resolution, vae_multiple(pipe))
    h, w = buckets[0]
    pipe.set_progress_bar_config(disable=True)
    seeds = [int(np.random.default_rng([seed, i]).integers(2**31)) for i in range(len(prompts))]
    with atomic_folder(out, LATENT_CACHE) as tmp:
        writer = _Writer(tmp, [])
        for start in progress(
            range(0, len(prompts), shard_size), desc="generate", total=-(-len(prompts) // shard_size)
        ):
            part = list(range(start, min(start + shard_size, len(prompts))))
            latents = [generate_latents(pipe, prompts[i], h, w, num_inference_steps, seeds[i], guidance) for i in part]
            texts = [t for i in part for t in encode_prompts(pipe, [prompts[i]], max_sequence_length)]
            writer.write(0, [f"prompt_{i:06d}" for i in part], latents, texts)
        _finish(
            pipe,
            tmp,
            writer,
            buckets,
            resolution,
            pipeline_path,
            max_sequence_length,
            {
                "source": "prompts",
                "prompts": prompts,
                "seed": seed,
                "noise_seeds": seeds,
                "num_inference_steps": num_inference_steps,
                "guidance": guidance,
            },
        )
    if free_encoders:
        release_encoders(pipe)
    return Path(out)


def _finish(
    pipe: Any,
    tmp: Path,
    writer: _Writer,
    buckets: list[tuple[int, int]],
    resolution: int,
    path: str | os.PathLike[str] | None,
    max_sequence_length: int | None,
    source: dict[str, Any],
) -> None:
    empty = encode_prompts(pipe, [""], max_sequence_length)
    save_tensors(stack_text(empty), tmp / EMPTY)
    counts = [sum(s["count"] for s in writer.shards if s["bucket"] == b) for b in range(len(buckets))]
    shapes = {}
    for shard in writer.shards:
        with safe_open(str(tmp / shard["file"]), framework="pt") as handle:
            shapes[shard["bucket"]] = list(handle.get_slice("latents").get_shape()[1:])
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "arch": get_spec(pipe.transformer).name,
        "pipeline": pipeline_info(pipe, path),
        "resolution": resolution,
        "multiple": vae_multiple(pipe),
        "buckets": [list(b) for b in buckets],
        "counts": counts,
        "n_samples": sum(counts),
        "latent_shapes": {str(b): s for b, s in sorted(shapes.items())},
        "encoder": _encoder_settings(pipe, max_sequence_length),
        "scheduler": dict(pipe.scheduler.config),
        "data": source,
        "shards": writer.shards,
    }
    write_json(json.loads(json.dumps(manifest, default=str)), tmp / MANIFEST)
    log.info("cache: %d samples in %d shards", sum(counts), len(writer.shards))
