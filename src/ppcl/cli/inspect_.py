"""``ppcl inspect``: what an artefact folder holds (calibration set, report, plan, add-on, model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ppcl.errors import ArtefactError
from ppcl.io import read_json

_KINDS = (
    ("ppcl_addon.json", "addon"),
    ("plan.json", "plan"),
    ("report.json", "report"),
    ("calibration.json", "calibration"),
    ("config.json", "model"),
)


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("inspect", help="describe any ppcl artefact folder")
    p.add_argument("path", help="artefact folder (or its JSON file)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_run)


def _manifest(path: Path) -> tuple[str, dict[str, Any]]:
    folder = path.parent if path.is_file() else path
    for file, kind in _KINDS:
        if (folder / file).is_file():
            return kind, read_json(folder / file, f"{kind} manifest")
    raise ArtefactError(
        "not a ppcl artefact",
        expected="a folder with " + " / ".join(f for f, _ in _KINDS),
        found=str(path),
        fix="pass a folder written by a ppcl command",
    )


def _summary(kind: str, m: dict[str, Any]) -> str:
    if kind == "calibration":
        return (
            f"CalibrationSet: {m['n_samples']} samples of {m['model_class']} (config {m['config_hash']}), "
            f"content {m['content_hash'][:12]}, source {m.get('meta', {}).get('source')}"
        )
    if kind == "report":
        spans = ", ".join(f"[{i['u']}, {i['v']}]" for i in m["intervals"])
        return (
            f"RedundancyReport: {m['model_class']} {sum(m['stack_sizes'])} blocks; intervals (inclusive): "
            f"{spans}; took {m['stats'].get('seconds')} s"
        )
    if kind == "plan":
        from ppcl.plan import PruningPlan

        return PruningPlan.from_json(m).summary()
    if kind == "addon":
        levels = ", ".join(lv["name"] for lv in m.get("plan", {}).get("levels", []))
        return (
            f"PruningAddon v{m.get('format_version')}: base {m.get('fingerprint', {}).get('class')}, "
            f"levels {levels}; metrics {json.dumps(m.get('metrics', {}))[:200]}"
        )
    return f"diffusers model: {m.get('_class_name')} ({m.get('num_layers')} layers)"


def _run(args: argparse.Namespace) -> int:
    kind, manifest = _manifest(Path(args.path))
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    try:
        text = _summary(kind, manifest)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a field missing or of the wrong shape
        raise ArtefactError(
            f"the {kind} manifest is incomplete",
            expected=f"the fields a ppcl {kind} records",
            found=f"{args.path}: {type(exc).__name__} {exc}",
            fix="re-create the artefact with ppcl, or read it raw with --json",
        ) from exc
    print(text)
    return 0
