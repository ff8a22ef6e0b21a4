"""Artefact folders and files follow the umask (issue 16): ``tempfile`` makes them private (0700 / 0600), which on a
shared machine hid every ppcl output from the user's group; now they get the modes ``mkdir`` / ``open`` would give."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ppcl.cli.main import main


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_plan_and_addon_folders_follow_the_umask(umask: int, tmp_path: Path) -> None:
    from ppcl.addon import PruningAddon
    from ppcl.plan import PruningPlan
    from tiny_models import build_tiny, two_span_plan

    model = build_tiny("flux").model
    plan = two_span_plan(model)
    written = plan.save(tmp_path / "plan")
    assert _mode(written) == 0o666 & ~umask
    assert PruningPlan.load(tmp_path / "plan").to_json() == plan.to_json()
    addon = PruningAddon.from_plan(model, plan).save_pretrained(tmp_path / "addon")
    assert _mode(addon) == 0o777 & ~umask
    for file in addon.iterdir():
        assert _mode(file) == 0o666 & ~umask, file.name


def test_cli_outputs_follow_the_umask(umask: int, tmp_path: Path) -> None:
    assert (
        main(["calibrate", "--out", str(tmp_path / "cal"), "--num-prompts", "2", "--steps", "2", "--timesteps", "2"])
        == 0
    )
    out = tmp_path / "cal"
    assert _mode(out) == 0o777 & ~umask
    assert {_mode(f) for f in out.rglob("*") if f.is_file()} == {0o666 & ~umask}
