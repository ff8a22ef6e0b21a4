"""The ``README.md`` model card written next to a saved add-on, generated from its manifest only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def model_card(manifest: Mapping[str, Any]) -> str:
    """Markdown describing the add-on: base model, levels (blocks, parameters), how to load it, metrics."""
    fp = manifest.get("fingerprint", {})
    levels = manifest.get("levels", [])
    base = fp.get("name_or_path") or fp.get("class", "?")
    first_level = levels[0]["name"] if levels else None
    lines = [
        f"# PPCL pruning add-on for {base}",
        "",
        "A pluggable depth-pruning add-on made with ppcl (Pluggable Pruning with Contiguous Layer Distillation). It "
        "holds one student block per replaced span of blocks; each level switches a set of spans to their students "
        "on the original model, in place and reversibly, or merges into a standalone smaller model.",
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
        "Spans are half-open flat block ranges `[start, stop)` (Python slices over all block stacks in order).",
        "",
        "| level | spans replaced | blocks | parameters |",
        "|---|---|---|---|",
    ]
    for lvl in levels:
        spans = ", ".join(f"`{r}`" for r in lvl.get("spans") or lvl.get("replacements", [])) or "none"
        blocks = lvl.get("blocks", {})
        params = lvl.get("params")
        params_text = (
            f"{_human(params['before'])} → {_human(params['after'])} (−{params['removed_fraction']:.1%})"
            if params else "n/a"
        )
        lines.append(f"| {lvl['name']} | {spans} | {blocks.get('before', '?')} → {blocks.get('after', '?')} | "
                     f"{params_text} |")
    level_arg = repr(first_level) if first_level is not None else "None"
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from ppcl.addon import PruningAddon; from ppcl.runtime import apply_addon, set_level",
        "addon = PruningAddon.from_pretrained(\"path/to/this/folder\", pipe.transformer)",
        f"apply_addon(pipe.transformer, addon, level={level_arg})  # set_level(pipe.transformer, None) = original",
        "```",
        "",
        "`ppcl.runtime.merge(transformer, addon, level)` bakes one level into a stock diffusers checkpoint "
        "with fewer blocks, loadable without ppcl.",
    ]
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", *_metrics_table(metrics)]
    provenance = manifest.get("provenance") or {}
    if provenance:
        lines += ["", "## Provenance", ""]
        lines += [f"- {key}: `{_short(value)}`" for key, value in sorted(provenance.items())]
    return "\n".join(lines) + "\n"


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    # {level: {metric: value}} renders as one row per level; anything else as a two-column table.
    if all(isinstance(v, Mapping) for v in metrics.values()):
        columns: list[str] = []
        for row in metrics.values():
            columns += [c for c in row if c not in columns]
        out = ["| level | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
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
