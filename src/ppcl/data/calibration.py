"""CalibrationSet: the transformer's own inputs, captured once from sampling runs.

Calibration is "prompts x timesteps x noise seeds covering the sampling schedule" (METHOD.md): we run the real sampler
(the toy sampler or a diffusers pipeline) and keep the exact keyword arguments the transformer receives at the chosen
denoising steps — noisy latents, timestep, prompt embeddings and masks, image shapes. Later stages replay them with
``model(**batch)`` and never need the text encoder or VAE again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppcl.arch import ArchSpec, ModelInputs, get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import atomic_folder, config_hash, content_hash, load_tensors, read_json, save_tensors, write_json
from ppcl.outputs import CALIBRATION

FORMAT_VERSION = 1
MANIFEST = "calibration.json"
WEIGHTS = "calibration.safetensors"
_SHARED_PREFIX = "shared."


@dataclass
class CalibrationSet:
    """Captured transformer inputs.

    Attributes:
        arch: ArchSpec name of the model the inputs were captured from.
        model_class: its class name.
        config_hash: hash of its config (inputs only fit models with the same input shapes).
        batched: per-sample tensors, each ``(N, ...)`` (e.g. ``hidden_states (N, N_img, C)``, ``timestep (N,)``).
        shared: tensors shared by every sample (FLUX.1 ``img_ids``, ``txt_ids``).
        lists: per-sample list arguments (Qwen-Image ``img_shapes``), each a list of length N.
        meta: provenance: prompts, seeds, steps kept, sampler settings, source.
    """

    arch: str
    model_class: str
    config_hash: str
    batched: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    lists: dict[str, list[Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    @property
    def content_hash(self) -> str:
        """SHA-256 of every tensor and list; identical captures have identical hashes."""
        tensors = {**self.batched, **{_SHARED_PREFIX + k: v for k, v in self.shared.items()}}
        return content_hash(tensors, {"lists": self.lists, "arch": self.arch, "config": self.config_hash})

    def batches(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[dict[str, Any]]:
        """Keyword-argument dicts for ``model(**batch)``, in order; floating tensors cast to ``dtype`` if given."""
        if batch_size < 1:
            raise ConfigError("batch size must be positive", expected=">= 1", found=str(batch_size))
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            batch: dict[str, Any] = {k: _to(v[start:stop], device, dtype) for k, v in self.batched.items()}
            batch.update({k: _to(v, device, dtype) for k, v in self.shared.items()})
            batch.update({k: v[start:stop] for k, v in self.lists.items()})
            yield batch

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` is not the kind of model these inputs were captured from."""
        spec = get_spec(model)
        found = (spec.name, config_hash(dict(model.config)))
        if found != (self.arch, self.config_hash):
            raise ArtefactError(
                "calibration set was captured from another model",
                expected=f"arch {self.arch}, config hash {self.config_hash}",
                found=f"arch {found[0]}, config hash {found[1]}",
                fix="run `ppcl calibrate` with this model",
            )

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``calibration.json`` + ``calibration.safetensors`` to ``folder`` atomically (an existing calibration
        set is replaced only with ``overwrite``; any other existing folder is refused, :mod:`ppcl.outputs`)."""
        tensors = {**self.batched, **{_SHARED_PREFIX + k: v for k, v in self.shared.items()}}
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "ppcl.CalibrationSet",
            "arch": self.arch,
            "model_class": self.model_class,
            "config_hash": self.config_hash,
            "n_samples": len(self),
            "content_hash": self.content_hash,
            "lists": self.lists,
            "meta": self.meta,
        }
        with atomic_folder(folder, CALIBRATION, overwrite) as tmp:
            save_tensors(tensors, tmp / WEIGHTS)
            write_json(manifest, tmp / MANIFEST)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], verify: bool = True) -> CalibrationSet:
        """Read a calibration folder; with ``verify`` the content hash must match the manifest."""
        folder = Path(folder)
        manifest = read_json(folder / MANIFEST, "calibration set manifest")
        if manifest.get("kind") != "ppcl.CalibrationSet":
            raise ArtefactError(
                "not a calibration set",
                expected="kind ppcl.CalibrationSet",
                found=str(manifest.get("kind")),
                fix="pass the folder written by `ppcl calibrate`",
            )
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ArtefactError(
                "calibration set is from a newer ppcl",
                expected=f"format <= {FORMAT_VERSION}",
                found=str(manifest["format_version"]),
                fix="upgrade ppcl",
            )
        missing = [k for k in ("arch", "model_class", "config_hash") if not isinstance(manifest.get(k), str)]
        if missing:
            raise ArtefactError(
                "calibration set manifest is incomplete",
                expected="arch, model_class, config_hash",
                found=f"missing or malformed: {missing} in {folder / MANIFEST}",
                fix="re-run `ppcl calibrate`",
            )
        tensors = load_tensors(folder / WEIGHTS, "calibration set")
        if not tensors:
            raise ArtefactError(
                "calibration set holds no tensors",
                expected="captured inputs",
                found=f"an empty {folder / WEIGHTS}",
                fix="re-run `ppcl calibrate`",
            )
        shared = {k[len(_SHARED_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_SHARED_PREFIX)}
        batched = {k: v for k, v in tensors.items() if not k.startswith(_SHARED_PREFIX)}
        _check_consistent(batched, manifest.get("n_samples"), folder)
        out = cls(
            manifest["arch"],
            manifest["model_class"],
            manifest["config_hash"],
            batched,
            shared,
            manifest.get("lists", {}),
            manifest.get("meta", {}),
        )
        if verify and out.content_hash != manifest.get("content_hash"):
            raise ArtefactError(
                "calibration set content does not match its manifest",
                expected=f"content hash {manifest.get('content_hash')}",
                found=out.content_hash,
                fix="the files were modified or mixed; re-run calibrate",
            )
        return out


def _check_consistent(batched: dict[str, torch.Tensor], n_samples: Any, folder: Path) -> None:
    """Every batched input has one row per sample (as many as the manifest says) and finite values: analysis and
    distillation on NaN inputs would fail far from the cause."""
    counts = {k: (t.shape[0] if t.dim() else None) for k, t in batched.items()}
    if not batched or len(set(counts.values())) != 1 or None in counts.values():
        raise ArtefactError(
            "calibration set inputs disagree on the number of samples",
            expected="one row per sample in every batched input",
            found=str(counts)[:160],
            fix="re-run `ppcl calibrate`",
        )
    n = next(iter(counts.values()))
    if isinstance(n_samples, int) and n_samples != n:
        raise ArtefactError(
            "calibration set does not hold the samples its manifest counts",
            expected=f"n_samples {n_samples} (calibration.json)",
            found=f"{n} rows in the tensors",
            fix="the files were mixed; re-run `ppcl calibrate`",
        )
    bad = sorted(k for k, t in batched.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ArtefactError(
            "calibration set inputs are not finite",
            expected="finite captured inputs",
            found=f"NaN/Inf in {bad} ({folder})",
            fix="re-run `ppcl calibrate` (check the model and dtype: fp16 overflows show up here)",
        )


def _to(t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t


class InputCapture:
    """Records the keyword arguments of a transformer's forward calls while ``keep()`` says so.

    Wrap a sampling run in :meth:`active`; the sampler's step callback calls :meth:`set_step`, and calls are kept
    when ``keep_step(step)`` is true. Tensors are detached and moved to CPU.
    """

    def __init__(self, model: nn.Module, keep_step: Callable[[int], bool]) -> None:
        self.model, self.spec, self.keep_step = model, get_spec(model), keep_step
        self.step = 0
        self.calls: list[dict[str, Any]] = []
        self.steps: list[int] = []

    def set_step(self, step: int) -> None:
        """Tell the capture which denoising step the next transformer calls belong to."""
        self.step = step

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args:
            raise ConfigError(
                "the transformer was called with positional arguments",
                expected="keyword arguments (as diffusers pipelines call it)",
                found=f"{len(args)} positional",
                fix="call the model with keywords",
            )
        if self.keep_step(self.step):
            self.calls.append({k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
            self.steps.append(self.step)

    @contextmanager
    def active(self) -> Iterator[InputCapture]:
        handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def to_calibration_set(self, meta: dict[str, Any]) -> CalibrationSet:
        """Concatenate the kept calls into one :class:`CalibrationSet`."""
        if not self.calls:
            raise ConfigError(
                "no transformer calls were captured",
                expected="at least one kept step",
                found="none",
                fix="check the step selection and the number of inference steps",
            )
        return assemble(self.spec, self.model, self.calls, {**meta, "captured_steps": self.steps})


def assemble(spec: ArchSpec, model: nn.Module, calls: list[dict[str, Any]], meta: dict[str, Any]) -> CalibrationSet:
    """Merge captured call kwargs into per-sample, shared and list entries, using the spec's ``model_inputs``."""
    inputs = spec.model_inputs
    batched: dict[str, list[torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    lists: dict[str, list[Any]] = {}
    for call in calls:
        n = call["hidden_states"].shape[0]
        if inputs.text_mask is not None and call.get(inputs.text_mask) is None:
            # Pipelines drop an all-ones mask; an explicit one lets prompts of different lengths be padded.
            text = call[inputs.text]
            call = {**call, inputs.text_mask: torch.ones(text.shape[:2], dtype=torch.long)}
        for name in inputs.batched:
            value = call.get(name)
            if value is None:
                continue
            if value.ndim == 0:  # a scalar timestep applies to the whole batch
                value = value.expand(n)
            batched.setdefault(name, []).append(value)
        for name in inputs.shared:
            value = call.get(name)
            if value is None:
                continue
            if name in shared and not torch.equal(shared[name], value):
                raise ConfigError(
                    f"`{name}` differs between captured calls",
                    expected="one image size per set",
                    found="several",
                    fix="calibrate each resolution into its own set",
                )
            shared[name] = value
        for name in inputs.per_sample_lists:
            value = call.get(name)
            if value is not None:
                lists.setdefault(name, []).extend(_one_level_deeper(_jsonable(list(value))))
    _pad_text(inputs, batched)
    counts = {name: len(parts) for name, parts in batched.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            "some inputs were missing in some captured calls",
            expected="every input in every call",
            found=str(counts),
            fix="capture from one pipeline configuration at a time",
        )
    return CalibrationSet(
        spec.name,
        type(model).__name__,
        config_hash(dict(model.config)),
        {k: torch.cat(v) for k, v in batched.items()},
        shared,
        lists,
        meta,
    )


def _pad_text(inputs: ModelInputs, batched: dict[str, list[torch.Tensor]]) -> None:
    """Pad prompt embeddings of different lengths (e.g. prompt vs negative prompt) with masked tokens, in place, for
    every ``(embedding, mask)`` pair the model takes."""
    for text_name, mask_name in inputs.text_pairs():
        texts = batched.get(text_name, [])
        longest = max((t.shape[1] for t in texts), default=0)
        if all(t.shape[1] == longest for t in texts):
            continue
        if mask_name is None or mask_name not in batched:
            raise ConfigError(
                f"captured prompt embeddings `{text_name}` have different lengths",
                expected="one text length (this model takes no text mask to pad with)",
                found=str(sorted({t.shape[1] for t in texts})),
                fix="use a fixed max_sequence_length for every prompt",
            )
        masks = batched[mask_name]
        for n, (text, mask) in enumerate(zip(texts, masks, strict=False)):
            extra = longest - text.shape[1]
            texts[n] = torch.nn.functional.pad(text, (0, 0, 0, extra))
            masks[n] = torch.nn.functional.pad(mask, (0, extra))


def _one_level_deeper(entries: list[Any]) -> list[Any]:
    """Per-sample entries as lists: ``(1, h, w)`` becomes ``[[1, h, w]]``.

    Qwen-Image accepts both ``[(1, h, w)] * B`` and ``[[(1, h, w)]] * B``, but JSON turns tuples into lists, which
    would make the first form ambiguous on reload; storing the second form always replays the same shapes.
    """
    return [[e] if isinstance(e, list) and e and all(isinstance(x, int) for x in e) else e for e in entries]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
