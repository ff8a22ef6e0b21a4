"""A cache of VAE latents + prompt embeddings for real-model distillation.

Built once with the pipeline's VAE and text encoder(s) (``ppcl cache``), read by
:class:`~ppcl.distill.latent_data.LatentCacheData` without them. Two ways in:

* :func:`build_image_cache`: image + caption data (:mod:`ppcl.data.images`), each image resized/centre-cropped to its
  resolution bucket and encoded with the VAE (the mode of its posterior), normalised the way the pipeline does it:
  FLUX.1 / SD3 ``(z - shift_factor) * scaling_factor``, Qwen-Image ``(z - latents_mean) / latents_std`` per channel.
* :func:`build_prompt_cache`: a prompt list; the teacher pipeline generates the images (the paper's setting) with
  ``output_type="latent"``, and its final (normalised) latents are stored, unpacked.

Layout of the cache folder (written atomically)::

    manifest.json              kind ppcl.LatentCache: arch, pipeline class/hash, buckets, counts, encoder settings,
                               scheduler config, shards (file, bucket, count, keys, content hash)
    shard_00000.safetensors    up to shard_size samples of ONE bucket: latents (n, C, h, w) float32,
                               prompt_embeds (n, T, D), pooled_prompt_embeds (n, D_pool) [FLUX.1, SD3],
                               prompt_embeds_mask (n, T) [Qwen-Image]
    empty_prompt.safetensors   the embedding of "" (caption dropout)

Latents are stored unpacked, ``(C, h, w)`` with ``h = H / vae_scale_factor``; the data source packs them per
architecture. After building, the text encoder(s) and VAE are dropped from the pipeline (:func:`release_encoders`).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ppcl.arch import get_spec
from ppcl.data.images import ImageRecord, assign_bucket, make_buckets, to_bucket
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import (
    atomic_folder,
    config_hash,
    contained_file,
    content_hash,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from ppcl.logging import get_logger, progress
from ppcl.outputs import LATENT_CACHE

log = get_logger("cache")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY = "empty_prompt.safetensors"
KIND = "ppcl.LatentCache"
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
TRANSFORMER_KEYS = ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")


# ---------------------------------------------------------------- per-architecture encoding (the pipelines' own code)


def vae_multiple(pipe: Any) -> int:
    """Bucket sides must be multiples of this: VAE scale factor x (2 for packed FLUX.1 / Qwen-Image, else patch)."""
    spec = get_spec(pipe.transformer)
    patch = 2 if spec.name in ("flux", "qwenimage") else int(pipe.transformer.config.patch_size)
    return int(pipe.vae_scale_factor) * patch


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int | None) -> list[dict[str, torch.Tensor]]:
    """Per-prompt embeddings through ``pipe.encode_prompt``: ``prompt_embeds (T, D)`` (+ ``pooled_prompt_embeds``).

    Qwen-Image embeddings are cut to their unmasked length (the reader pads them back with a mask).
    """
    arch = get_spec(pipe.transformer).name
    kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    device = pipe._execution_device
    with torch.no_grad():
        if arch == "flux":
            pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **kw)
            return [{"prompt_embeds": pe[i].cpu(), "pooled_prompt_embeds": pooled[i].cpu()} for i in range(len(pe))]
        if arch == "sd3":
            pe, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False, **kw
            )
            return [{"prompt_embeds": pe[i].cpu(), "pooled_prompt_embeds": pooled[i].cpu()} for i in range(len(pe))]
        pe, mask = pipe.encode_prompt(prompt=prompts, device=device, **kw)
    lengths = [pe.shape[1]] * len(pe) if mask is None else mask.sum(1).tolist()
    return [{"prompt_embeds": pe[i, :n].cpu()} for i, n in enumerate(lengths)]


def encode_images(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(B, C, h, w)`` float32 of images ``(B, 3, H, W)`` in ``[-1, 1]`` (posterior mode)."""
    vae = pipe.vae
    arch = get_spec(pipe.transformer).name
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        if arch == "qwenimage":
            z = vae.encode(x.unsqueeze(2)).latent_dist.mode()  # (B, C, 1, h, w)
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
            return ((z - mean) / std)[:, :, 0].float().cpu()
        z = vae.encode(x).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return ((z - shift) * vae.config.scaling_factor).float().cpu()


def generate_latents(
    pipe: Any, prompt: str, height: int, width: int, steps: int, seed: int, guidance: float | None
) -> torch.Tensor:
    """The teacher's final normalised latents ``(C, h, w)`` for ``prompt`` (``output_type="latent"``, unpacked)."""
    arch = get_spec(pipe.transformer).name
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
    if arch == "flux":  # packed (1, N, 4C)
        out = pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)
    elif arch == "qwenimage":  # packed (1, N, 4C) → (1, C, 1, h, w)
        out = pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)[:, :, 0]
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
    vae = pipe.vae.config
    norm = (
        {
            "kind": "(z - latents_mean) / latents_std",
            "latents_mean": list(vae.latents_mean),
            "latents_std": list(vae.latents_std),
        }
        if get_spec(pipe.transformer).name == "qwenimage"
        else {
            "kind": "(z - shift_factor) * scaling_factor",
            "shift_factor": vae.get("shift_factor") or 0.0,
            "scaling_factor": vae.scaling_factor,
        }
    )
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
        tensors.update(_stack_text(texts))
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_tensors(tensors, self.folder / name)
        self.shards.append(
            {"file": name, "bucket": bucket, "count": len(keys), "keys": keys, "content_hash": content_hash(tensors)}
        )


def _stack_text(texts: list[dict[str, torch.Tensor]], length: int | None = None) -> dict[str, torch.Tensor]:
    """Stack per-sample text tensors; Qwen-Image's variable-length embeddings are padded with a mask."""
    out: dict[str, torch.Tensor] = {}
    if "prompt_embeds_mask" in texts[0] or all("pooled_prompt_embeds" not in t for t in texts):
        lengths = [t["prompt_embeds"].shape[0] for t in texts]
        if "prompt_embeds_mask" in texts[0]:
            lengths = [int(t["prompt_embeds_mask"].sum()) for t in texts]
        longest = max(lengths) if length is None else length
        out["prompt_embeds"] = torch.stack(
            [
                torch.nn.functional.pad(t["prompt_embeds"][:n], (0, 0, 0, longest - n))
                for t, n in zip(texts, lengths, strict=True)
            ]
        )
        out["prompt_embeds_mask"] = torch.stack([(torch.arange(longest) < n).long() for n in lengths])
        return out
    out["prompt_embeds"] = torch.stack([t["prompt_embeds"] for t in texts])
    out["pooled_prompt_embeds"] = torch.stack([t["pooled_prompt_embeds"] for t in texts])
    return out


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
        chunks = [
            (b, rs[i : i + shard_size]) for b, rs in sorted(per_bucket.items()) for i in range(0, len(rs), shard_size)
        ]
        for bucket, chunk in progress(chunks, desc="cache", total=len(chunks)):
            latents: list[torch.Tensor] = []
            texts: list[dict[str, torch.Tensor]] = []
            for i in range(0, len(chunk), encode_batch):
                part = chunk[i : i + encode_batch]
                pixels = torch.stack([to_bucket(r.open(), buckets[bucket]) for r in part])
                latents.extend(encode_images(pipe, pixels))
                texts.extend(encode_prompts(pipe, [r.caption for r in part], max_sequence_length))
            writer.write(bucket, [r.key for r in chunk], latents, texts)
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
    save_tensors(_stack_text(empty), tmp / EMPTY)
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


# ---------------------------------------------------------------- reading


class LatentCache:
    """Read access to a cache folder written by :func:`build_image_cache` / :func:`build_prompt_cache`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        manifest = read_json(self.folder / MANIFEST, "latent cache manifest")
        if manifest.get("kind") != KIND:
            raise ArtefactError(
                "not a latent cache",
                expected=f"kind {KIND}",
                found=str(manifest.get("kind")),
                fix="pass the folder written by `ppcl cache`",
            )
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ArtefactError(
                "latent cache is from a newer ppcl",
                expected=f"format <= {FORMAT_VERSION}",
                found=str(manifest["format_version"]),
                fix="upgrade ppcl",
            )
        self.manifest = manifest
        self.arch: str = manifest["arch"]
        self.buckets: list[tuple[int, int]] = [tuple(b) for b in manifest["buckets"]]  # type: ignore[misc]
        self.counts: list[int] = list(manifest["counts"])
        # bucket → [(shard file, first row of the bucket in it, count)]
        self._rows: dict[int, list[tuple[str, int, int]]] = {}
        for shard in manifest["shards"]:
            contained_file(self.folder, shard.get("file"), "latent cache shard")
            if not (self.folder / shard["file"]).is_file():
                raise ArtefactError(
                    "latent cache shard missing",
                    expected=shard["file"],
                    found=f"nothing at {self.folder / shard['file']}",
                    fix="re-run `ppcl cache`",
                )
            parts = self._rows.setdefault(shard["bucket"], [])
            start = parts[-1][1] + parts[-1][2] if parts else 0
            parts.append((shard["file"], start, shard["count"]))
        self.empty = load_tensors(self.folder / EMPTY, "latent cache empty prompt")
        self._verified: set[str] = set()

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.manifest.get("scheduler", {}))

    def verify(self) -> None:
        """Check every shard against the content hash in the manifest."""
        for shard in self.manifest["shards"]:
            self._verify_shard(shard["file"])

    def _verify_shard(self, file: str) -> None:
        """Check one shard against its manifest hash, once per cache object (the first read of the shard)."""
        if file in self._verified:
            return
        shard = next(s for s in self.manifest["shards"] if s["file"] == file)
        found = content_hash(load_tensors(self.folder / file, "latent cache shard"))
        if found != shard.get("content_hash"):
            raise ArtefactError(
                "latent cache shard does not match its manifest",
                expected=f"content hash {shard.get('content_hash')}",
                found=f"{found} in {file}",
                fix="the files were modified; re-run `ppcl cache`",
            )
        self._verified.add(file)

    def read(self, bucket: int, rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``rows`` (indices within ``bucket``, in that order) stacked: latents, embeddings (padded)."""
        samples: list[dict[str, torch.Tensor]] = []
        for row in (int(r) for r in rows):
            if not 0 <= row < self.counts[bucket]:
                raise ConfigError("cache row out of range", expected=f"0..{self.counts[bucket] - 1}", found=str(row))
            file, start, _ = next(p for p in self._rows[bucket] if p[1] <= row < p[1] + p[2])
            samples.append(self._row(file, row - start))
        return self.stack(samples)

    def _row(self, file: str, i: int) -> dict[str, torch.Tensor]:
        self._verify_shard(file)  # training never reads a modified or swapped shard unknowingly
        with safe_open(str(self.folder / file), framework="pt") as handle:
            return {k: handle.get_slice(k)[i : i + 1][0] for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)

    def stack(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack per-sample dicts (as :meth:`read` makes them); text padded to the longest with its mask."""
        out = {"latents": torch.stack([s["latents"] for s in samples])}
        out.update(_stack_text([{k: v for k, v in s.items() if k != "latents"} for s in samples]))
        return out

    def iter_samples(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(bucket, sample)`` for every sample, in storage order."""
        for bucket, parts in sorted(self._rows.items()):
            for file, _, count in parts:
                for i in range(count):
                    yield bucket, self._row(file, i)
