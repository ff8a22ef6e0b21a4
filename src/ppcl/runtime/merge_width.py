"""Width substitutions of a merged model: make them, record them, replay them (``load_merged``), never pickle.

A merged level with width replacements is the depth-merged stock model plus, per width-modified block (indexed by its
*merged* flat position):

* dropped submodules set to ``None`` (text-pruned: the text modules except text K/V; FFN-pruned: the stream's FFN);
* the stream's modulation linear cut to its attention-half rows (the family's ``WidthTargets.attention_chunks``:
  ``D → 3D``; SD3.5 dual-attention ``D → 6D``, chunks 0-2 and 6-8), because the MLP rows are no longer computed;
* projections as block submodules ``ppcl_text_in`` / ``ppcl_text_out`` / ``ppcl_ffn_image`` / ``ppcl_ffn_text``
  (:class:`~ppcl.modules.projection.ResidualLinear`);
* an instance ``forward`` running :func:`~ppcl.modules.width.width_forward`; blocks of one text run share a
  :class:`~ppcl.modules.width.RunContext`.

The record (``ppcl_merged.json`` next to diffusers' ``config.json`` and weights) lists exactly these substitutions, so
:func:`load_merged` rebuilds the model: class from config on the meta device → replay → load the safetensors weights.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from ppcl.addon.card import merged_card
from ppcl.addon.manifest import CARD_FILE
from ppcl.arch import ArchSpec, get_spec
from ppcl.errors import ArtefactError
from ppcl.hub import resolve_folder, upload_folder
from ppcl.io import load_tensors, read_json, write_json, write_text
from ppcl.modules.dispatch import COMPILE_ATTR
from ppcl.modules.projection import ResidualLinear
from ppcl.modules.width import RunContext, WidthMode, WidthParts, run_width
from ppcl.runtime.block_map import BLOCK_MAP_ATTR, BlockMap, saved_path
from ppcl.runtime.controlnet import attach_block_map
from ppcl.runtime.merged_component import register_component

MERGED_FILE = "ppcl_merged.json"
MERGED_FORMAT = "ppcl.merged_width"
MERGED_FORMAT_VERSION = 1
RECORD_ATTR = "ppcl_merged_record"
"""Attribute of a width-merged model holding its substitution record (a JSON-able dict)."""
_PART_ATTRS = {
    "text_in": "ppcl_text_in",
    "text_out": "ppcl_text_out",
    "image": "ppcl_ffn_image",
    "text": "ppcl_ffn_text",
}


def substitution(spec: ArchSpec, model: nn.Module, index: int, mode: WidthMode) -> dict[str, Any]:
    """The record of one width-modified block at merged flat ``index`` of ``model`` (before it is modified)."""
    targets = spec.width_targets(model, index)
    block = spec.block(model, index)
    drop = [] if mode.text_full else [n for n in targets.text if n not in targets.text_kv]
    cut: dict[str, list[int]] = {}
    for stream in sorted(mode.ffn):
        drop.append(dict(targets.ffn)[stream])
        name = dict(targets.modulation)[stream]
        linear = block.get_submodule(name)
        cut[name] = list(targets.attention_rows(linear.out_features // linear.in_features))
    parts = [p for p, on in (("text_in", mode.text in ("pruned", "last")), ("text_out", mode.text == "last")) if on]
    return {
        "block": index,
        "block_name": spec.block_name(model, index),
        "text": mode.text,
        "run": mode.run,
        "ffn": sorted(mode.ffn),
        "drop": drop,
        "cut_modulation": cut,
        "projections": parts + sorted(mode.ffn),
    }


def replay(
    model: nn.Module,
    record: Mapping[str, Any],
    projections: Mapping[tuple[int, str], nn.Module] | None = None,
    proj_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Apply the substitutions of ``record`` to ``model`` in place (weights kept where the structure survives).

    Args:
        model: a stock model built from the merged config (real weights, or the meta device before loading).
        record: the record written by :func:`ppcl.runtime.merge` (``ppcl_merged.json``).
        projections: ``(merged flat index, part) → module`` to install (cloned); missing ones are fresh identities.
        proj_dtype: dtype of every installed projection (given ones are cast to it).
    """
    spec = get_spec(model)
    contexts: dict[str, RunContext] = {}
    for sub in record["substitutions"]:
        i = int(sub["block"])
        block = spec.block(model, i)
        for name in sub["drop"]:
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, None)
        for name, chunks in sub["cut_modulation"].items():
            _cut_rows(block, name, [int(c) for c in chunks])
        device = next(block.parameters()).device
        parts = WidthParts()
        for part in sub["projections"]:
            given = None if projections is None else projections.get((i, part))
            if given is not None:
                module = _clone(given).to(proj_dtype)
            else:
                module = ResidualLinear(int(block.attn.to_q.in_features), dtype=proj_dtype, device=device)
            setattr(block, _PART_ATTRS[part], module)
            if part in ("text_in", "text_out"):
                setattr(parts, part, module)
            else:
                parts.ffn[part] = module
        run = sub.get("run")
        ctx = contexts.setdefault(run, RunContext()) if run is not None else None
        mode = WidthMode(sub["text"], frozenset(sub["ffn"]), run)
        block.forward = _MergedForward(block, spec.stack_of(model, i).input_names, mode, parts, ctx)
        block.compile = _RegionalCompile(block)
    setattr(model, RECORD_ATTR, dict(record))
    # Not a stock model any more: pipelines save it as ppcl's diffusers component, which loads it back.
    return register_component(model)


class _MergedForward:
    """Instance ``forward`` of a width-modified block of a merged model (a callable object: deep-copyable)."""

    def __init__(
        self, block: nn.Module, input_names: Sequence[str], mode: WidthMode, parts: WidthParts, ctx: RunContext | None
    ) -> None:
        self.block, self.input_names, self.mode, self.parts, self.ctx = block, tuple(input_names), mode, parts, ctx

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        bound = dict(zip(self.input_names, args, strict=False))
        bound.update(kwargs)
        options = self.block.__dict__.get(COMPILE_ATTR)
        return run_width(self.block, bound, self.mode, self.parts, self.ctx, options)


class _RegionalCompile:
    """Instance ``compile`` of a width-modified block of a merged model (``compile_repeated_blocks`` calls it).

    ``nn.Module.compile`` would compile the block's whole call: one graph per block of each mode and run, all on one
    code object, past torch's recompile limit on a real plan. The options are recorded instead, and the block's
    forward runs the compiled copy of its mode (:func:`~ppcl.modules.width.run_width`).
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.block.__dict__[COMPILE_ATTR] = (args, kwargs)


def save_merged(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """diffusers' ``save_pretrained(folder)`` plus :func:`write_records`. A merged model's own ``save_pretrained``
    (and so a pipeline's) does the same (:func:`install_merged_save`)."""
    folder = Path(folder)
    type(model).save_pretrained(model, str(folder))
    write_records(model, folder)
    return folder


def write_records(model: nn.Module, folder: Path) -> None:
    """Write next to a saved merged model what makes it loadable as one: ``ppcl_merged.json`` (width substitutions),
    ``ppcl_blocks.json`` (the base blocks behind each block) and the ``README.md`` card, as far as ``model`` has them."""
    block_map = getattr(model, BLOCK_MAP_ATTR, None)
    record = getattr(model, RECORD_ATTR, None)
    if record is not None:
        write_json(record, folder / MERGED_FILE)
    if block_map is not None:
        block_map.save(folder)
        write_text(_card(model, block_map, record is not None), folder / CARD_FILE)


def install_merged_save(model: nn.Module) -> nn.Module:
    """Give a merged ``model`` an instance ``save_pretrained`` that also writes its records, so saving it the diffusers
    way — ``model.save_pretrained`` or a pipeline's ``save_pretrained``, which calls each component's — gives a folder
    :func:`load_merged` and :func:`ppcl.load_pipeline` load back. Returns ``model``."""
    model.save_pretrained = _MergedSave(model)
    return model


class _MergedSave:
    """The instance ``save_pretrained`` of a merged model (a callable object: merged models stay deep-copyable)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__signature__ = inspect.signature(functools.partial(type(model).save_pretrained, model))

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        # diffusers would upload before the records exist: upload after them instead.
        push = kwargs.pop("push_to_hub", False)
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        write_records(self.model, Path(save_directory))
        if push:
            repo_id = hub.pop("repo_id", Path(save_directory).name)
            upload_folder(save_directory, repo_id, **{k: v for k, v in hub.items() if v is not None})


def folder_card(folder: str | os.PathLike[str], repo_id: str | None = None, license: str | None = None) -> str:
    """The card of a merged folder written by ``ppcl merge``, from its files alone (``ppcl_blocks.json``, the weights'
    safetensors headers), e.g. to push it with its snippet loading ``repo_id``.

    Raises:
        ArtefactError: no ``ppcl_blocks.json`` (not a ppcl merge), an unknown model class, unreadable weights.
    """
    from safetensors import safe_open

    from ppcl.plan.count import resolve_model_class

    folder = Path(folder)
    block_map = BlockMap.load(folder)
    spec = get_spec(resolve_model_class(block_map.model_class))
    count = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            count += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
    blocks = {s.attr: (s.base_size, len(s.starts)) for s in block_map.stacks}
    width = (folder / MERGED_FILE).is_file()
    return merged_card(
        spec.name, block_map.model_class, block_map.level, block_map.base_model, blocks, count, width, repo_id, license
    )


def _card(model: nn.Module, block_map: BlockMap, width: bool) -> str:
    spec = get_spec(model)
    blocks = {s.attr: (s.base_size, len(s.starts)) for s in block_map.stacks}
    count = sum(p.numel() for p in model.parameters())
    return merged_card(spec.name, block_map.model_class, block_map.level, block_map.base_model, blocks, count, width)


def load_merged(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """A merged model saved by :func:`save_merged`, with its ControlNet mapping (``ppcl_blocks.json``) attached.

    Width merges: config → meta-device model → replay the substitutions of ``ppcl_merged.json`` → load weights.
    Depth-only merges are stock diffusers folders and load with their class's ``from_pretrained``. ``dtype``: the
    weights' dtype (``None``: as saved for width merges, diffusers' default for depth-only ones). ``path`` may be a Hub
    id, resolved through the local Hugging Face cache like :meth:`ppcl.PruningAddon.from_pretrained` (``revision``,
    ``local_files_only`` (default ``True``: never download), ``cache_dir``, ``token``).

    Raises:
        ArtefactError: no model there, a malformed record, or weights that do not match the replayed structure.
    """
    from ppcl.data.loading import load_transformer

    folder = resolve_folder(
        path, "merged model", revision=revision, local_files_only=local_files_only, cache_dir=cache_dir, token=token
    )
    if (folder / MERGED_FILE).is_file():
        model = _load_width_merged(folder, dtype)
    else:
        model = load_transformer(folder, dtype)
    if saved_path(folder) is not None:
        attach_block_map(model, BlockMap.load(folder))
        install_merged_save(model)
    return model


def _load_width_merged(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    from ppcl.plan.count import resolve_model_class

    record_path = folder / MERGED_FILE
    record = read_json(record_path, "merged-model record")
    if record.get("format") != MERGED_FORMAT or int(record.get("format_version", 0)) > MERGED_FORMAT_VERSION:
        raise ArtefactError(
            f"{record_path} is not a record this ppcl can read",
            expected=f"format {MERGED_FORMAT!r} version <= {MERGED_FORMAT_VERSION}",
            found=f"{record.get('format')!r} {record.get('format_version')!r}",
            fix="upgrade ppcl",
        )
    missing = [k for k, kind in (("model_class", str), ("substitutions", list)) if not isinstance(record.get(k), kind)]
    proj_dtype = getattr(torch, str(record.get("projection_dtype", "float32")), None)
    if missing or not isinstance(proj_dtype, torch.dtype):
        raise ArtefactError(
            f"{record_path} is incomplete",
            expected="`model_class` (text), `substitutions` (list) and a torch `projection_dtype`",
            found=f"missing or malformed: {missing or ['projection_dtype']}",
            fix="re-save the merged model with ppcl.runtime.save_merged",
        )
    cls = resolve_model_class(record["model_class"])
    if not (folder / "config.json").is_file():
        raise ArtefactError(
            f"No config.json in {folder}",
            expected="a folder written by ppcl.runtime.save_merged",
            found="no model config",
            fix="re-save the merged model with ppcl.runtime.save_merged",
        )
    config = cls.load_config(str(folder))
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config)
            replay(model, record, proj_dtype=proj_dtype)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ArtefactError(
            f"{record_path} does not fit the model in {folder}",
            expected="substitutions recorded by ppcl.runtime.merge for this config",
            found=f"{type(err).__name__}: {err}",
            fix="re-save the merged model with ppcl.runtime.save_merged",
        ) from err
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ArtefactError(
            f"No weights in {folder}",
            expected="*.safetensors files",
            found="none",
            fix="re-save the merged model with ppcl.runtime.save_merged",
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_tensors(file, "merged model"))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ArtefactError(
            f"The weights in {folder} do not fit the replayed model",
            expected="exactly its tensors",
            found=str(err)[:300],
            fix="re-save the merged model with ppcl.runtime.save_merged",
        ) from err
    return model.eval()


def make_record(model_class: str, level: str, subs: list[dict[str, Any]], proj_dtype: torch.dtype) -> dict[str, Any]:
    """The JSON object written to ``ppcl_merged.json``."""
    return {
        "format": MERGED_FORMAT,
        "format_version": MERGED_FORMAT_VERSION,
        "model_class": model_class,
        "level": level,
        "projection_dtype": str(proj_dtype).removeprefix("torch."),
        "index_convention": "block = flat block index of the merged model (0-based, over all stacks in order)",
        "substitutions": subs,
    }


def _cut_rows(block: nn.Module, name: str, chunks: list[int]) -> None:
    old = block.get_submodule(name)
    d = old.in_features
    new = nn.Linear(d, len(chunks) * d, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    if not old.weight.is_meta:
        with torch.no_grad():
            rows = torch.cat([torch.arange(c * d, (c + 1) * d) for c in chunks]).to(old.weight.device)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, new)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone
