"""The README's "Python API" snippet runs as printed (with tiny step counts) and keeps its 15-line promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under '## Python API'"
    return match.group(1)


def test_api_snippet_fits_in_15_lines() -> None:
    assert len(_api_snippet().strip().splitlines()) <= 15


def test_api_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ppcl

    small = (
        _api_snippet()
        .replace("steps=600", "steps=2")
        .replace("batch_size=32", "batch_size=4")
        .replace("num_prompts=32", "num_prompts=4")
    )
    assert small != _api_snippet()  # the substitutions still match the README
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(small, str(README), "exec"), scope)  # noqa: S102 - our own README
    model, addon = scope["model"], scope["addon"]
    assert ppcl.runtime.active_level(model) == "p40"
    merged = ppcl.load_merged(tmp_path / "runs/api/small")
    kept = addon.plan.kept_blocks("p25+w")
    assert len(merged.transformer_blocks) == len(kept) < len(model.transformer_blocks)
    for stage in ("depth", "width", "ft"):
        assert (tmp_path / "runs/api" / stage / "addon" / "ppcl_addon.json").is_file()
