"""The ``README.md`` model card written next to a saved add-on, generated from its manifest only: Hub YAML metadata
(``huggingface_hub.ModelCardData``) and a Markdown body."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

from ppcl.arch import spec_by_name
from ppcl.errors import UnsupportedModelError
from ppcl.hub import is_hub_id, repo_id_of_path


def model_card(manifest: Mapping[str, Any], repo_id: str | None = None, license: str | None = None) -> str:
    """A Hub model card: YAML metadata (``huggingface_hub.ModelCardData``: ``base_model`` when the base is a Hub id,
    ``library_name: ppcl``, tags, ``pipeline_tag``, ``license`` when given) and Markdown describing the add-on: base
    model, levels (depth spans, width replacements, blocks, parameters), its width projections, a runnable snippet
    (loading the add-on by ``repo_id`` when it is pushed there), metrics. A local base path is never written (the card
    is made to be shared)."""
    body = _body(manifest, repo_id)
    return f"---\n{card_data(manifest.get('fingerprint', {}), 'ppcl', license).to_yaml()}\n---\n\n{body}"


def card_data(fingerprint: Mapping[str, Any], library: str, license: str | None = None) -> ModelCardData:
    """The YAML metadata of a card for an artefact of the base ``fingerprint`` (``arch``, ``name_or_path``)."""
    arch = fingerprint.get("arch")
    try:
        task = spec_by_name(arch).pipeline_tag if isinstance(arch, str) else None
    except UnsupportedModelError:  # an add-on of a family this ppcl does not know: no task claimed
        task = None
    hub_id = hub_id_of(fingerprint.get("name_or_path"))
    tags = ["ppcl", "pruning", "diffusers", *([arch] if isinstance(arch, str) else [])]
    return ModelCardData(base_model=hub_id, library_name=library, tags=tags, pipeline_tag=task, license=license)


def hub_id_of(name_or_path: Any) -> str | None:
    """The Hub repository ``name_or_path`` names: itself when spelled ``owner/name`` and not a folder here, the repo of
    a Hugging Face cache snapshot path, else ``None`` (a local path is never written into a card)."""
    if not isinstance(name_or_path, str):
        return None
    cached = repo_id_of_path(name_or_path)
    if cached is not None:
        return cached
    if "/" not in name_or_path or not is_hub_id(name_or_path):
        return None
    return None if os.path.exists(name_or_path) else name_or_path


def _body(manifest: Mapping[str, Any], repo_id: str | None) -> str:
    fp = manifest.get("fingerprint", {})
    levels = manifest.get("levels", [])
    projections = manifest.get("projections") or {}
    has_width = bool(projections) or any(lvl.get("width") for lvl in levels)
    base = hub_id_of(fp.get("name_or_path")) or fp.get("class", "?")
    first_level = levels[0]["name"] if levels else None
    what = (
        "one student block per replaced span of blocks and residual linear projections for its width "
        "replacements (text-stream runs, FFN blocks)"
        if has_width
        else "one student block per replaced span of blocks"
    )
    lines = [
        f"# PPCL pruning add-on for {base}",
        "",
        (
            f"A pluggable {'depth- and width' if has_width else 'depth'}-pruning add-on made with ppcl (Pluggable Pruning "
            f"with Contiguous Layer Distillation). It holds {what}; each level switches a set of replacements on the "
            "original model, in place and reversibly, or merges into a standalone smaller model."
        ),
        "",
        "## Base model",
        "",
        f"- class: `{fp.get('class', '?')}` (architecture `{fp.get('arch', '?')}`)",
        f"- config hash: `{fp.get('config_hash', '?')}`",
        f"- blocks per stack: {fp.get('stack_sizes', '?')}",
        f"- made with ppcl {manifest.get('ppcl_version', '?')}, add-on format {manifest.get('format_version', '?')}",
        "",
        "## Levels",
        "",
        (
            "Spans are half-open flat block ranges `[start, stop)` (Python slices over all block stacks in order); text "
            "runs also give the paper's inclusive range."
        ),
        "",
        "| level | spans replaced |" + (" width replacements |" if has_width else "") + " blocks | parameters |",
        "|---|---|" + ("---|" if has_width else "") + "---|---|",
    ]
    for lvl in levels:
        spans = ", ".join(f"`{r}`" for r in lvl.get("spans", lvl.get("replacements", []))) or "none"
        width = (", ".join(f"`{r}`" for r in lvl.get("width") or []) or "none") + " | " if has_width else ""
        blocks = lvl.get("blocks", {})
        params = lvl.get("params")
        params_text = (
            f"{_human(params['before'])} → {_human(params['after'])} (−{params['removed_fraction']:.1%})"
            if params
            else "n/a"
        )
        lines.append(
            f"| {lvl['name']} | {spans} | {width}{blocks.get('before', '?')} → {blocks.get('after', '?')} | "
            f"{params_text} |"
        )
    if projections:
        lines += [
            "",
            "## Width projections",
            "",
            "Residual linear maps `z + z Wᵀ + b` (`W` of the shape below), stored as `<key>.W`, `<key>.b`.",
            "",
            "| key | replacement | kind | part | shape | parameters |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{key}` | `{e.get('replacement', '?')}` | {e.get('kind', '?')} | {e.get('part', '?')} | "
            f"{e.get('shape', '?')} | {_human(int(e.get('num_params', 0)))} |"
            for key, e in projections.items()
        ]
    level_arg = repr(first_level) if first_level is not None else "None"
    merge_note = (
        "`ppcl.runtime.merge(transformer, addon, level)` bakes one level into a new model with fewer blocks: "
        "a depth-only level is a stock diffusers checkpoint loadable without ppcl; a level with width "
        "replacements is saved with `ppcl.runtime.save_merged` (`ppcl merge` does this) and loads with "
        "`ppcl.load_merged`."
        if has_width
        else "`ppcl.runtime.merge(transformer, addon, level)` bakes one level into a stock diffusers checkpoint "
        "with fewer blocks, loadable without ppcl."
    )
    lines += ["", "## How to load", "", *load_snippet(fp, repo_id, level_arg), "", merge_note]
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", *_metrics_table(metrics, {lvl["name"] for lvl in levels})]
    provenance = manifest.get("provenance") or {}
    if provenance:
        lines += ["", "## Provenance", ""]
        lines += [f"- {key}: `{_short(value)}`" for key, value in sorted(provenance.items())]
    return "\n".join(lines) + "\n"


_SNIPPET_HEAD = ("```python", "import torch", "from diffusers import DiffusionPipeline", "", "import ppcl", "")
"""The opening lines of every card's Python snippet."""


def load_snippet(fingerprint: Mapping[str, Any], repo_id: str | None, level_arg: str) -> list[str]:
    """The card's runnable Python: the base pipeline, this add-on (by ``repo_id`` or a folder), one level, an image."""
    base = hub_id_of(fingerprint.get("name_or_path")) or "path/to/the/base/pipeline"
    source = (
        f"{repo_id!r}, pipe.transformer, local_files_only=False"
        if repo_id
        else '"path/to/this/folder", pipe.transformer'
    )
    return [
        *_SNIPPET_HEAD,
        f"pipe = DiffusionPipeline.from_pretrained({base!r}, dtype=torch.bfloat16)",
        f"addon = ppcl.PruningAddon.from_pretrained({source})",
        f"ppcl.apply_addon(pipe.transformer, addon, level={level_arg})  # ppcl.set_level(pipe.transformer, None): the original",
        'image = pipe("a red fox in the snow").images[0]',
        "```",
    ]


def merged_card(
    arch: str,
    model_class: str,
    level: str,
    base_model: str | None,
    blocks: Mapping[str, tuple[int, int]],
    num_params: int,
    width: bool,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The ``README.md`` of a merged-model folder: YAML metadata (``base_model`` when a Hub id, ``library_name``
    ``diffusers`` for a depth-only merge (a stock checkpoint) or ``ppcl``, tags, ``pipeline_tag``, ``license`` when
    given) and Markdown: what was removed (``blocks``: per stack, base → merged count), the parameter count, a runnable
    snippet (loading the folder by ``repo_id`` when it is pushed there)."""
    data = card_data({"arch": arch, "name_or_path": base_model}, "ppcl" if width else "diffusers", license)
    base = base_model or model_class
    source = f"{repo_id!r}, local_files_only=False" if repo_id else '"path/to/this/folder"'
    load = f"transformer = ppcl.load_merged({source}, dtype=torch.bfloat16)" + (
        "" if width else f"  # or the stock {model_class}.from_pretrained"
    )
    rows = [f"| `{attr}` | {before} | {after} |" for attr, (before, after) in blocks.items()]
    lines = [
        f"# {base}, pruned with PPCL (level {level})",
        "",
        f"Level `{level}` of a PPCL pruning add-on merged into a standalone `{model_class}` with fewer blocks "
        f"({_human(num_params)} parameters): each replaced span of blocks is one trained student block"
        + (", and width-pruned blocks run residual linear maps instead of their text stream or FFN." if width else ".")
        + (
            " Load it with `ppcl.load_merged` (the width substitutions are recorded in `ppcl_merged.json`)."
            if width
            else " It is a stock diffusers checkpoint."
        ),
        "",
        "| stack | base blocks | blocks here |",
        "|---|---|---|",
        *rows,
        "",
        "`ppcl_blocks.json` records which base blocks each block stands for: `ppcl.load_merged` uses it to give "
        "ControlNet residuals (indexed by the base's blocks) to the right blocks, and "
        '`ppcl.runtime.remap_lora_state_dict(lora, "path/to/this/folder")` renumbers a LoRA of the base model.',
        "",
        *_SNIPPET_HEAD,
        load,
        f"pipe = DiffusionPipeline.from_pretrained({(base_model or 'path/to/the/base/pipeline')!r}, "
        "transformer=transformer, dtype=torch.bfloat16)",
        'image = pipe("a red fox in the snow").images[0]',
        "```",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _metrics_table(metrics: Mapping[str, Any], level_names: set[str]) -> list[str]:
    # {row: {column: value}} renders as one row per key, headed "level" when the rows are levels, "metric" otherwise
    # (e.g. depth_loss: {replacement id: loss}); anything else as a two-column table.
    if all(isinstance(v, Mapping) for v in metrics.values()):
        columns: list[str] = []
        for row in metrics.values():
            columns += [c for c in row if c not in columns]
        label = "level" if set(metrics) <= level_names else "metric"
        out = [f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, row in metrics.items():
            out.append(f"| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
        return out
    return ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _short(value)


def _short(value: Any, limit: int = 120) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)
