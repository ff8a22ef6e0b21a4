"""A cache of VAE latents + prompt embeddings for real-model distillation.

Built once with the pipeline's VAE and text encoder(s) (``ppcl cache``, :mod:`ppcl.data.latent_build`), read by
:class:`~ppcl.distill.latent_data.LatentCacheData` without them. Two ways in:

* :func:`~ppcl.data.latent_build.build_image_cache`: image + caption data (:mod:`ppcl.data.images`), each image resized/centre-cropped to its
  resolution bucket and encoded with the VAE (the mode of its posterior), normalised the way the pipeline does it:
  FLUX.1 / SD3 ``(z - shift_factor) * scaling_factor``, Qwen-Image ``(z - latents_mean) / latents_std`` per channel.
* :func:`~ppcl.data.latent_build.build_prompt_cache`: a prompt list; the teacher pipeline generates the images (the paper's setting) with
  ``output_type="latent"``, and its final (normalised) latents are stored, unpacked.

Layout of the cache folder (written atomically)::

    manifest.json              kind ppcl.LatentCache: arch, pipeline class/hash, buckets, counts, encoder settings,
                               scheduler config, shards (file, bucket, count, keys, content hash)
    shard_00000.safetensors    up to shard_size samples of ONE bucket: latents (n, C, h, w) float32,
                               prompt_embeds (n, T, D), pooled_prompt_embeds (n, D_pool) [FLUX.1, SD3],
                               prompt_embeds_mask (n, T) [Qwen-Image]
    empty_prompt.safetensors   the embedding of "" (caption dropout)

Latents are stored unpacked, ``(C, h, w)`` with ``h = H / vae_scale_factor``; the data source packs them per
architecture. After building, the text encoder(s) and VAE are dropped from the pipeline (:func:`~ppcl.data.latent_build.release_encoders`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import (
    contained_file,
    content_hash,
    load_tensors,
    read_json,
)
from ppcl.logging import get_logger

log = get_logger("cache")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY = "empty_prompt.safetensors"
KIND = "ppcl.LatentCache"
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
TRANSFORMER_KEYS = ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")


def stack_text(texts: list[dict[str, torch.Tensor]], length: int | None = None) -> dict[str, torch.Tensor]:
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
        out.update(stack_text([{k: v for k, v in s.items() if k != "latents"} for s in samples]))
        return out

    def iter_samples(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(bucket, sample)`` for every sample, in storage order."""
        for bucket, parts in sorted(self._rows.items()):
            for file, _, count in parts:
                for i in range(count):
                    yield bucket, self._row(file, i)
